"""The cuda platform: NVIDIA GPUs with NCCL collectives."""
