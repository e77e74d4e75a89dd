"""The cpu platform: the reference that runs everything anywhere (gloo, plain torch)."""
