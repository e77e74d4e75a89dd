"""What a platform plugin provides: device, distributed backend, memory, defaults, kernels."""

from __future__ import annotations

from typing import Optional

import torch

from epplat.core.ops import TORCH, Kernels


class Platform:
    name = "base"
    device_type = "cpu"
    dist_backend = "gloo"
    ray_resource = "GPU"            # the Ray resource one engine process takes (one bundle per device)
    default_all2all = "allgather_reducescatter"
    default_graph_runner = "eager"
    default_max_num_batched_tokens = 2048   # --max-num-batched-tokens when not given
    compiles_kernels = False        # True: the engine warms every kernel variant up before serving
    # the fast paths this platform hands the model (epplat.core.ops); an instance sets its own record
    kernels: Kernels = TORCH

    @classmethod
    def check(cls) -> Optional[str]:
        """None when this platform can run here, else a short reason."""
        return None

    @classmethod
    def apply_additional_config(cls, cfg) -> None:
        """Check ``cfg.additional_config`` (``--additional-config`` JSON) and apply it to ``cfg``;
        ConfigError (one line) for what this platform does not take. The base platform takes no keys."""
        if cfg.additional_config:
            from epplat.config import ConfigError
            raise ConfigError(f"--additional-config: platform {cls.name!r} takes no keys; got "
                              f"{', '.join(sorted(cfg.additional_config))}")

    @classmethod
    def device_count(cls) -> Optional[int]:
        """How many engine processes this node can give a device of their own (one each, by local rank);
        None: no limit. Checked at startup and by an elastic EP scale-up (400 beyond it)."""
        return None

    def configure(self, cfg) -> None:
        """Called in every engine process with its EngineConfig, before the device is set up."""

    def device(self, local_rank: int = 0) -> torch.device:
        """Select and return the device this process computes on."""
        return torch.device(self.device_type)

    def kv_cache_bytes(self, cache_cfg, weight_bytes: int, device: torch.device, profile=None) -> int:
        """Bytes the KV cache may take on `device` after the weights are loaded. ``profile()`` runs
        the largest step (returning the bytes of the scratch KV cache it used) for platforms that
        size the cache from measured peak memory."""
        raise NotImplementedError

    def before_step(self, num_tokens: int) -> None:
        """Called before each forward with the number of tokens in the batch."""

    def zeros(self, shape, dtype, device) -> torch.Tensor:
        """A zero-filled tensor for the KV cache (never-written slots are read, masked, as 0)."""
        return torch.zeros(shape, dtype=dtype, device=device)

    def synchronize(self) -> None:
        pass

    def auto_dtype(self, checkpoint_dtype: str) -> tuple[str, Optional[str]]:
        """The dtype ``--dtype auto`` computes a `checkpoint_dtype` checkpoint in, and why when it
        is not that one."""
        return checkpoint_dtype, None

    def slower_path(self, dtype: torch.dtype) -> Optional[str]:
        """Why this platform runs slower code than the flags imply (e.g. kernels that decline
        `dtype`), said once at startup; None when it runs its fastest path."""
        return None

    def log_prefix(self) -> str:
        """What the KV cache log line calls the device ("GPU", "CPU", "NPU")."""
        return "GPU"
