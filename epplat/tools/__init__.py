"""Tooling around the engine that is not the model: random-weight checkpoints (`epplat make-model`),
their tokenizer, the built-in demo model, and the `epplat bench serve` load generator."""
