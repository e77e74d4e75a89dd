"""Mixture-of-Experts: router, MoE layer, experts, all2all backends, expert map."""
