"""torchair graph mode for decode steps (``--additional-config '{"torchair_graph_config": {"enabled": true}}'``).

The model is compiled with ``torch.compile`` on torchair's NPU backend (GE graphs) and
run for a fixed set of decode batch sizes (``graph_batch_sizes``, else the engine's
sizes up to ``--max-num-seqs``); a decode batch is padded to the next size, its padding
rows writing K/V to a scratch slot and reading the zero block. Prefill and mixed steps,
and batches above the largest size, run eagerly, as vllm-ascend does. With
``use_cached_graph`` each batch size gets its own graph through
``torchair.inference.cache_compile`` (compiled once, reloaded from disk on restart).

Without ``use_cached_graph``, steps that must talk to the host (the hccl all2all's split
sizes) split the graph there. ``cache_compile`` compiles whole graphs (``fullgraph=True``
in torchair's _cache_compiler.py), so a cached decode step must not sync with the host: the
MoE experts keep their counts on the device while traced (``capturable_experts``), and the
platform refuses cached graphs with expert parallelism or W8A8 (their counts go to the host).
torchair reloads a cache without guards, keyed on the model's repr and the function's name,
so the cache directory also names the KV cache's shape, which can change between restarts.
Every batch size gets its own graph: the recompile limit is raised to the number of sizes,
and a size dynamo still did not compile is named in a warning.
"""

from __future__ import annotations

import logging
import os
import types

import torch

from epplat.core.engine.graph import StaticDecodeRunner

logger = logging.getLogger(__name__)


class TorchairGraphRunner(StaticDecodeRunner):
    replays_kernels = False

    def __init__(self, model, device):
        super().__init__(model, device)
        from epplat.platforms.ascend.ascend_config import current
        self.opts = current().torchair_graph_config
        self._multistream()

    def _multistream(self) -> None:
        """enable_multistream_moe / enable_multistream_mla: hand DeepSeek's layers their second streams."""
        from epplat.platforms.ascend.multistream import side_stream
        placed = {}
        for on, attr, tag in ((self.opts.enable_multistream_moe, "shared_side_stream", "moe_secondary"),
                              (self.opts.enable_multistream_mla, "query_side_stream", "mla_secondary")):
            mods = [m for m in self.model.modules() if on and hasattr(m, attr)
                    and getattr(m, "shared_experts", True) is not None]     # MoE: layers with shared experts
            if mods:
                stream = side_stream(tag)
                for m in mods:
                    setattr(m, attr, stream)
                placed[tag] = len(mods)
        if placed:
            logger.info("torchair multistream: %s", ", ".join(f"{n} layers use stream {t}" for t, n in placed.items()))

    def compiler_config(self):
        import torchair
        config = torchair.CompilerConfig()
        config.experimental_config.frozen_parameter = True         # weights never change between steps
        config.experimental_config.tiling_schedule_optimize = True
        return config

    def _cache_dir(self) -> str:
        """torchair's cache directory, one folder per KV cache shape (a reloaded graph keeps the shapes it
        was compiled for, and the cache key does not see them)."""
        base = os.getenv("TORCHAIR_CACHE_HOME", os.path.join(os.getcwd(), ".torchair_cache"))
        kv = next((tuple(t.shape) for m in self.model.modules() for t in (getattr(m, "kv_cache", None) or ())), ())
        return os.path.join(base, "kv_cache_" + "x".join(map(str, kv)))

    def _compile(self, size: int, shared: list):
        import torchair
        config = self.compiler_config()
        if self.opts.use_cached_graph:
            # cache_compile keys its on-disk cache on the method's name: one renamed forward per batch size
            forward = type(self.model).forward
            code = forward.__code__.replace(co_name=f"forward_decode_bs{size}")
            fn = types.FunctionType(code, forward.__globals__, code.co_name, forward.__defaults__, forward.__closure__)
            return torchair.inference.cache_compile(types.MethodType(fn, self.model), config=config, dynamic=False,
                                                    cache_dir=self._cache_dir(), ge_cache=False)
        if not shared:
            backend = torchair.get_npu_backend(compiler_config=config)

            def counted(gm, example_inputs):          # which batch sizes dynamo really compiled
                self.compiled.add(self._capturing)
                return backend(gm, example_inputs)
            shared.append(torch.compile(self.model, dynamic=False, fullgraph=False, backend=counted))
        return shared[0]

    def capture(self, batch_sizes, max_blocks_per_seq: int, pad_block: int, scratch_slot: int) -> None:
        import torchair
        torchair.patch_for_hcom()             # collectives inside the graphs become HCCL graph ops
        sizes = sorted(set(self.opts.graph_batch_sizes or batch_sizes))
        self._allocate(sizes[-1], max_blocks_per_seq, pad_block, scratch_slot)
        shared: list = []
        self.compiled: set = set()
        # dynamo compiles a frame at most recompile_limit (8) times, then runs it eagerly: one per size here
        dynamo = torch._dynamo.config
        dynamo.recompile_limit = max(dynamo.recompile_limit, len(sizes))
        with torch.inference_mode():
            for g in reversed(sizes):          # largest first, as vllm-ascend compiles them
                self._capturing = g
                self.graphs[g] = self._compile(g, shared)
                for _ in range(2):             # compile, then run once compiled
                    self.graphs[g](self.ids[:g], self.pos[:g], self._meta(g))
        self.sizes = sizes
        eager = [] if self.opts.use_cached_graph else [g for g in sizes if g not in self.compiled]
        if eager:
            logger.warning("torchair compiled no graph for decode batch sizes %s: they run eagerly", eager)
        logger.info("torchair graphs for decode batch sizes %s%s", [g for g in sizes if g not in eager],
                    " (cached graphs)" if self.opts.use_cached_graph else "")

    def forward(self, input_ids, positions, meta):
        g = self._stage(input_ids, positions, meta)
        if g is None:
            return self.model(input_ids, positions, meta)
        return self.graphs[g](self.ids[:g], self.pos[:g], self._meta(g))[:input_ids.shape[0]]
