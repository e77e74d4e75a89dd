"""epplat: a device-agnostic expert-parallel serving engine for MoE models."""

__version__ = "0.1.0"
