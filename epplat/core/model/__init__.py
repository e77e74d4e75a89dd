"""Model layers, architectures and the safetensors loader."""
