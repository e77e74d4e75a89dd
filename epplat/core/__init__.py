"""The device-agnostic core: model, MoE, engine, distributed, server."""
