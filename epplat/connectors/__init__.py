"""KV connectors: moving KV cache blocks between engines (prefill/decode disaggregation)."""
