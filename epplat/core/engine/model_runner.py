"""The model runner: builds the model on a platform, owns the KV cache, runs a step.

One step takes the scheduler's (request, num_new_tokens) list, lays the tokens out
decodes first, runs the forward, and samples a token for every request whose
prompt (or recomputation) is complete after this step.
"""

from __future__ import annotations

import logging
import math
import time

from typing import Optional

import msgspec
import torch

from epplat.config import ConfigError, EngineConfig
from epplat.core.distributed.parallel_state import ParallelState
from epplat.core.engine.request import Request
from epplat.core.engine.sampler import sample_tokens, sampled_logprobs, token_logprobs
from epplat.core.engine.structured_output import fill_bitmask
from epplat.core.host_copy import HostCopy, to_device
from epplat.core.model.attention import build_attn_metadata
from epplat.core.model.decoder import MoEForCausalLM
from epplat.core.model.loader import load_checkpoint
from epplat.core.model.quant import load_quant_method
from epplat.core.model.registry import architecture
from epplat.core.moe.all2all import ExpertMap
from epplat.core.moe.layer import FusedMoE
from epplat.plugins import registry

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(requested: str, hf: dict, platform) -> tuple[torch.dtype, Optional[str]]:
    """The dtype to compute in, and a line to say when it is not the one asked for
    (``--dtype auto`` takes the checkpoint's, as the platform serves it)."""
    if requested != "auto":
        return _DTYPES[requested], None
    ckpt = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    served, why = platform.auto_dtype(ckpt if ckpt in _DTYPES else "float32")
    note = f"--dtype auto: the {ckpt} checkpoint runs in {served} ({why}); --dtype {ckpt} keeps {ckpt}" if why else None
    return _DTYPES[served], note


class ModelInput(msgspec.Struct, array_like=True, tag=True):
    """One step's model input; the driver sends it to its TP workers."""

    token_ids: list[int]
    positions: list[int]
    seqs: list[tuple[int, int, list[int]]]      # (context_len, q_len, block_table), decodes first
    ep_counts: Optional[list[int]] = None       # tokens of every EP rank this step
    kv_meta: Optional[bytes] = None             # the KV connector's step metadata (msgpack)
    out_rows: Optional[list[int]] = None        # pipeline parallel: the rows the last stage sends the driver
    # async scheduling: rows whose token was sampled by the step before (on the device, not known to the host),
    # their index in that step's sampled tokens, and how many it sampled
    fill_rows: Optional[list[int]] = None
    fill_src: Optional[list[int]] = None
    num_prev: int = 0


class DraftInput(msgspec.Struct, array_like=True, tag=True):
    """One pass of the MTP draft model (speculative decoding), sent to the TP workers like a step."""

    token_ids: list[int]                        # token p+1 for each position p
    positions: list[int]
    seqs: list[tuple[int, int, list[int]]]
    src: list[int]                              # rows of the previous hidden states that go with them
    from_draft: bool                            # previous = the last draft pass's output (else the step's)


class KVLoad(msgspec.Struct, array_like=True, tag=True):
    """KV connector metadata for loads that start between steps (no step to ride on), sent to the TP workers."""

    kv_meta: bytes


class ModelRunner:
    def __init__(self, cfg: EngineConfig, platform, device, ps: Optional[ParallelState] = None):
        cfg.check()          # the same one-line errors for a config built in Python as for `epplat serve`
        self.cfg, self.platform, self.device = cfg, platform, device
        self.ps = ps = ps or ParallelState()
        hf = cfg.model.hf_config()
        arch = architecture(hf)
        self.arch = arch
        self.model_cfg = arch.parse_config(hf)
        self.dtype, dtype_note = resolve_dtype(cfg.model.dtype, hf, platform)
        self.kernels = platform.kernels     # the platform's Kernels record (epplat.core.ops), handed to the model
        if cfg.speculative is not None:
            self.model_cfg.use_mtp = True          # deepseek_mtp: the model also builds its MTP layer
        if ps.rank == 0:      # said once, by the first engine process
            for note in filter(None, (dtype_note, platform.slower_path(self.dtype))):
                logger.warning(note)
        reg = registry()
        backend_name = cfg.parallel.all2all_backend or platform.default_all2all
        backend_cls = reg.load("all2all", backend_name, platform.name)
        par = cfg.parallel
        redundant = par.eplb.num_redundant_experts if par.enable_eplb or par.enable_elastic_ep else 0
        emap = ExpertMap(self.model_cfg.num_experts or 1, ps.ep_rank, ps.ep_size, redundant)
        self.all2all = backend_cls(emap, group=ps.ep_group, device=device)
        torch.manual_seed(cfg.model.seed)
        t0 = time.time()
        with torch.device(device):
            self.model = getattr(arch, "MODEL", MoEForCausalLM)(self.model_cfg, self.all2all, self.dtype, ps,
                                                                  self.kernels)
        quant = load_quant_method(cfg, arch.canonical_name, platform.name)
        if quant:
            quant.process_model(self.model)
        self.weight_bytes = load_checkpoint(self.model, cfg.model.model, arch.canonical_name, device,
                                            show_progress=ps.rank == 0, quant=quant)
        if quant:
            quant.after_loading(self.model)
        self.model.eval()
        logger.info("Loading weights took %.2f seconds; model weights take %.4f GiB (%s, dtype %s, all2all %s)",
                    time.time() - t0, self.weight_bytes / (1 << 30), hf["architectures"][0],
                    str(self.dtype).removeprefix("torch."), backend_name)
        moe_layers = [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, FusedMoE)]
        if ps.ep and not moe_layers:               # a pipeline stage of dense layers only (first_k_dense_replace)
            logger.info("Expert placement: pipeline stage %d holds no MoE layers", ps.pp_rank)
        elif ps.ep and not redundant:
            logger.info("Expert placement: EP rank %d/%d holds experts %d-%d of %d; resident expert bytes "
                        "%d of %d (1/%d)", ps.ep_rank, ps.ep_size, emap.local_ids.start, emap.local_ids.stop - 1,
                        emap.num_experts, self.expert_bytes(), self.expert_bytes() * ps.ep_size, ps.ep_size)
        elif ps.ep:
            first = moe_layers[0]
            logger.info("Expert placement: EP rank %d/%d holds physical experts %d-%d of %d (logical experts %s); "
                        "resident expert bytes %d", ps.ep_rank, ps.ep_size, emap.local_ids.start,
                        emap.local_ids.stop - 1, emap.num_physical, first.local_logical_ids(), self.expert_bytes())
        # EPLB balances each stage's experts over its own EP group: a stage with no MoE layers has none
        self.eplb = self._eplb_state(emap) if par.enable_eplb and moe_layers else None
        runner = "eager" if cfg.enforce_eager else platform.default_graph_runner
        self.stage = None
        if ps.pp_size > 1:
            from epplat.core.distributed.pipeline import StageLink
            self.stage = StageLink(ps, self.model_cfg.hidden_size, self.dtype, device)
            if ps.tp_rank == 0 and ps.dp_rank == 0:
                logger.info("Pipeline stage %d/%d holds layers %d-%d of %d", ps.pp_rank, ps.pp_size, self.model.start,
                            self.model.end - 1, self.model_cfg.num_layers)
            if runner != "eager" and ps.rank == 0:
                logger.warning("graph runner %s off (running eagerly): pipeline stages take hidden states in, "
                               "which its captured steps do not", runner)
            runner = "eager"
        self.graph = reg.load("graph_runner", runner, platform.name)(self.model, device)
        self.block_size = cfg.cache.block_size
        self.drafter = None                        # set by the engine core with --speculative-config
        self.rows: list = []                       # (request, first row, first position) of the last step
        self.prompt_rows: list = []
        self.kv_connector = None
        self.last_tokens = None                    # the last launched step's sampled tokens (on the device)
        self.last_index: dict[str, int] = {}       # and each request's index in them

    def attach_kv_connector(self) -> None:
        """The worker side of the --kv-transfer-config connector, given this rank's KV cache."""
        from epplat.connectors.base import KVConnectorRole
        from epplat.connectors.loader import make_connector
        self.kv_connector = make_connector(self.cfg, KVConnectorRole.WORKER, self.ps.dp_rank, self.ps.tp_rank,
                                           self.ps.pp_rank)
        if self.kv_connector is not None:
            self._kv_meta_decoder = msgspec.msgpack.Decoder(self.kv_connector.metadata_type)
            self.kv_connector.register_kv_caches([layer.self_attn.kv_cache for layer in self.model.layers])

    def kv_start_load(self, kv_meta: bytes) -> None:
        self.kv_connector.start_load_kv(self._kv_meta_decoder.decode(kv_meta))

    def kv_busy(self) -> bool:
        return self.kv_connector is not None and self.kv_connector.busy()

    def _eplb_state(self, emap: ExpertMap):
        from epplat.core.moe.eplb_state import EplbState
        par = self.cfg.parallel
        policy = registry().load("eplb_policy", par.eplb.policy, self.platform.name)
        layers = [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, FusedMoE)]
        local = 1 if par.external_lb else (par.data_parallel_size_local or par.data_parallel_size)
        nodes = par.data_parallel_size // local if par.data_parallel_size % local == 0 else 1
        return EplbState(par.eplb, layers, emap, policy, group=self.ps.ep_group,
                         num_groups=getattr(self.model_cfg, "num_expert_groups", 1), num_nodes=nodes,
                         peer_ranks=self.ps.ep_groups_ranks())

    def expert_bytes(self) -> int:
        """Bytes of expert weights resident on this rank."""
        return sum(p.numel() * p.element_size() for layer in self.model.layers if isinstance(layer.mlp, FusedMoE)
                   for p in (layer.mlp.w13, layer.mlp.w2))

    def kv_bytes_per_block(self) -> int:
        """Every layer's KV cache tensors (an MLA layer: one latent "head") for one block."""
        elt = torch.tensor([], dtype=self.dtype).element_size()
        return sum(math.prod(s) for attn in self.model.kv_layers()
                   for s in attn.kv_cache_shapes(1, self.block_size)) * elt

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """num_blocks usable blocks, then a zero pad block and a scratch block (graph padding writes)."""
        self.pad_block = num_blocks
        for attn in self.model.kv_layers():
            attn.kv_cache = tuple(self.platform.zeros(s, self.dtype, self.device)
                                  for s in attn.kv_cache_shapes(num_blocks + 2, self.block_size))

    def capture_graphs(self, max_model_len: int) -> None:
        """Capture decode steps when the graph runner can (after the KV cache exists)."""
        if not self.graph.captures:
            return
        why = None
        if self.dtype not in (torch.bfloat16, torch.float16):
            why = "expert GEMMs in float32 synchronise with the host; use --dtype bfloat16"
        elif self.ps.ep_size > 1:
            why = "expert-parallel steps exchange data-dependent token counts"
        elif self.eplb is not None:
            why = "EPLB changes the expert placement at run time"
        if why and self.graph.replays_kernels:
            logger.warning("CUDA graphs off (running eagerly): %s", why)
            return
        sizes = [s for s in (1, 2, 4, 8, *range(16, 257, 16)) if s <= self.cfg.scheduler.max_num_seqs]
        t0 = time.time()
        self.graph.capture(sizes, -(-max_model_len // self.block_size), self.pad_block,
                           (self.pad_block + 1) * self.block_size)
        logger.info("Graph capturing finished in %.1f s", time.time() - t0)

    @torch.inference_mode()
    def warm_up(self, max_model_len: int) -> None:
        """Run steps of every size class the kernels specialise on (prefill chunks of 1 to
        max_num_batched_tokens tokens, decode batches mixed with a prefill chunk, a chunk after a cached
        prefix) into the scratch block, so that no request pays a kernel compile. Only for platforms whose
        kernels compile on first use (``compiles_kernels``)."""
        if not self.platform.compiles_kernels:
            return
        t0 = time.time()
        sched, scratch = self.cfg.scheduler, self.pad_block + 1
        sizes = sorted({n for p in range(20) for n in (1 << p, 3 << p >> 1) if n <= sched.max_num_batched_tokens})
        steps = []
        for n in sizes:
            lens = [min(max_model_len, n - i) for i in range(0, n, max_model_len)]
            steps.append([(m, m) for m in lens])
        steps += [[(1, 1)] * b + [(2, 2)] for b in sizes if b < sched.max_num_seqs and b + 2 <= sched.max_num_batched_tokens]
        # a chunk after a cached prefix (a long prompt's later chunk, a prefix-cache hit), alone and after a
        # decode: its attention reads the cache (a kernel of its own on some platforms)
        if max_model_len >= 32 and sched.max_num_batched_tokens >= 17 and sched.max_num_seqs >= 2:
            steps += [[(32, 16)], [(1, 1), (32, 16)]]
        eplb, self.eplb = self.eplb, None
        try:
            for seqs in steps:
                total = sum(q for _, q in seqs)
                self.forward(ModelInput([0] * total, [p for c, q in seqs for p in range(c - q, c)],
                                        [(c, q, [scratch] * -(-c // self.block_size)) for c, q in seqs],
                                        [total] * self.ps.ep_size if self.ps.ep_size > 1 else None))
        finally:
            self.eplb = eplb
        if self.kernels.sample is not None and self.model.lm_head is not None:
            # both variants of the sampling kernel: one key and temperature for the batch, or one a row
            logits = torch.zeros(2, self.model.lm_head.shape[0], device=self.device)
            self.kernels.sample(logits, 1.0, 0)
            self.kernels.sample(logits, torch.ones(2, device=self.device), torch.zeros(2, dtype=torch.long,
                                                                                      device=self.device))
        self.platform.synchronize()
        logger.info("Kernel warm-up (%d step shapes) took %.1f s", len(steps), time.time() - t0)

    @torch.inference_mode()
    def profile_run(self, max_model_len: int) -> int:
        """The largest step (max_num_batched_tokens prompt tokens, split into sequences of at most
        max_model_len) into a scratch KV cache, so the platform can see peak activation memory.
        Returns the scratch cache's bytes, which are not activations."""
        total = self.cfg.scheduler.max_num_batched_tokens
        lens = [min(max_model_len, total - i) for i in range(0, total, max_model_len)]
        tables, nblk = [], 0
        for n in lens:
            k = -(-n // self.block_size)
            tables.append(list(range(nblk, nblk + k)))
            nblk += k
        self.allocate_kv_cache(nblk)
        ids = [0] * total
        pos = [p for n in lens for p in range(n)]
        eplb, self.eplb = self.eplb, None          # not an engine step: no EPLB step, no load
        try:
            hidden = self.forward(ModelInput(ids, pos, [(n, n, t) for n, t in zip(lens, tables)],
                                             [total] * self.ps.ep_size if self.ps.ep_size > 1 else None))
        finally:
            self.eplb = eplb
            if eplb is not None:
                eplb.reset()
        if self.model.lm_head is not None and self.stage is None:
            self.model.compute_logits(hidden[-min(len(hidden), self.cfg.scheduler.max_num_seqs):])
        scratch = (nblk + 2) * self.kv_bytes_per_block()
        for attn in self.model.kv_layers():
            attn.kv_cache = None
        return scratch

    def num_blocks_from_memory(self, max_model_len: int) -> int:
        cache = self.cfg.cache
        if cache.num_gpu_blocks_override:
            return cache.num_gpu_blocks_override
        budget = self.platform.kv_cache_bytes(cache, self.weight_bytes, self.device,
                                              profile=lambda: self.profile_run(max_model_len))
        n = budget // self.kv_bytes_per_block()
        if n <= 0:
            raise ConfigError("no memory left for the KV cache; lower the model size or raise the KV budget")
        return int(n)

    PROMPT_LOGPROB_ROWS = 256      # prompt positions whose logits are computed at once (prompt_logprobs)

    def _prompt_logprobs(self, hidden: torch.Tensor) -> None:
        """Requests asking prompt_logprobs: the logprobs of the prompt tokens this step's positions
        predict, appended to ``req.prompt_logprobs``."""
        todo = self.prompt_rows
        for i in range(0, len(todo), self.PROMPT_LOGPROB_ROWS):
            part = todo[i:i + self.PROMPT_LOGPROB_ROWS]
            logits = self.model.compute_logits(hidden[torch.tensor([row for row, _, _ in part], device=self.device)])
            entries = token_logprobs(logits, [t for _, _, t in part], [r.params.prompt_logprobs for _, r, _ in part])
            for (_, req, _), entry in zip(part, entries):
                req.prompt_logprobs.append(entry)

    def prepare(self, batch: list[tuple[Request, int]], ep_counts=None, kv_meta=None):
        """Lay a scheduled batch out as a ModelInput (decodes first); returns it and who samples where."""
        batch = sorted(batch, key=lambda rn: rn[1] != 1)
        ids, pos, seqs, sample_rows, sample_reqs = [], [], [], [], []
        fill_rows, fill_src = [], []
        self.rows = []
        self.prompt_rows = []       # (row, request, the prompt token it predicts) for prompt_logprobs
        for req, n in batch:
            start = req.num_computed
            self.rows.append((req, len(ids), start))
            if req.params.prompt_logprobs is not None:
                # position p predicts prompt token p + 1; positions done before a preemption are skipped
                self.prompt_rows += [(len(ids) + p - start, req, req.token_ids[p + 1])
                                     for p in range(max(start, len(req.prompt_logprobs)),
                                                    min(start + n, req.prompt_len - 1))]
            # speculative drafts follow the request's tokens; every one of them is sampled at too
            tokens = req.token_ids + req.spec_token_ids if req.spec_token_ids else req.token_ids
            ids.extend(tokens[start:start + n])
            if start + n > len(tokens):             # its token sampled by the step in flight: filled on the device
                fill_rows.append(len(ids))
                fill_src.append(self.last_index[req.request_id])
                ids.append(0)
            pos.extend(range(start, start + n))
            seqs.append((start + n, n, req.block_table))
            for p in range(max(start, req.num_known - 1), start + n):
                sample_rows.append(len(ids) - (start + n - p))
                sample_reqs.append(req)
        mi = ModelInput(ids, pos, seqs, ep_counts, kv_meta)
        if fill_rows:
            mi.fill_rows, mi.fill_src, mi.num_prev = fill_rows, fill_src, len(self.last_tokens)
        return mi, sample_rows, sample_reqs

    @torch.inference_mode()
    def forward(self, mi: ModelInput) -> torch.Tensor:
        """The model forward for one step (every TP rank runs it; an empty input is a dummy step)."""
        dev = self.device
        if hasattr(self.all2all, "set_step_tokens"):
            self.all2all.set_step_tokens(mi.ep_counts)
        meta = build_attn_metadata(mi.seqs, self.block_size, dev, self.pad_block, self.kernels)
        kv_meta = self._kv_meta_decoder.decode(mi.kv_meta) if mi.kv_meta is not None else None
        if kv_meta is not None:
            self.kv_connector.start_load_kv(kv_meta)
        self.platform.before_step(len(mi.token_ids))
        ids = to_device(mi.token_ids, torch.long, dev)
        pos = to_device(mi.positions, torch.long, dev)
        if mi.fill_rows:
            ids.index_copy_(0, to_device(mi.fill_rows, torch.long, dev),
                            self._prev_tokens(mi).index_select(0, to_device(mi.fill_src, torch.long, dev)))
        hidden = self.graph.forward(ids, pos, meta) if self.stage is None else self._stage_forward(mi, ids, pos, meta)
        if kv_meta is not None:
            self.kv_connector.save_kv(kv_meta)
        if self.eplb is not None:
            self.eplb.end_step()
        if getattr(self.model, "mtp", None) is not None:
            self.hidden = hidden                   # the draft model's input after the step
        return hidden

    def _prev_tokens(self, mi: ModelInput) -> torch.Tensor:
        """The tokens the step before sampled, on this rank's device: the driver's own, sent to its TP
        workers over the TP group (a device collective: no host sync)."""
        if self.ps.tp_size == 1:
            return self.last_tokens
        import torch.distributed as dist
        t = self.last_tokens if self.ps.tp_rank == 0 else torch.empty(mi.num_prev, dtype=torch.long, device=self.device)
        dist.broadcast(t, group=self.ps.tp_group, group_src=0)
        return t

    def _stage_forward(self, mi: ModelInput, ids, pos, meta) -> torch.Tensor:
        """This pipeline stage's layers: hidden states in from the previous stage, out to the next one (the
        last stage's TP rank 0 sends the driver the rows it samples from). An empty step sends nothing."""
        link, n = self.stage, len(mi.token_ids)
        x = None if link.first else link.recv_hidden(n) if n else torch.empty(0, link.hidden, dtype=self.dtype,
                                                                               device=self.device)
        hidden = self.model(ids, pos, meta, x)     # empty steps too: MoE layers are collective over the EP group
        if not link.last and n:
            link.send_hidden(hidden)
        elif link.last and mi.out_rows and self.ps.tp_rank == 0:
            link.send_output(hidden[torch.tensor(mi.out_rows, dtype=torch.long, device=self.device)])
        return hidden

    @torch.inference_mode()
    def draft_forward(self, d: DraftInput) -> torch.Tensor:
        """One MTP pass (every TP rank runs it); returns its hidden states."""
        dev = self.device
        if hasattr(self.all2all, "set_step_tokens"):
            self.all2all.set_step_tokens(None)     # the step's counts are not the pass's: exchange them per layer
        meta = build_attn_metadata(d.seqs, self.block_size, dev, self.pad_block)
        src = torch.tensor(d.src, dtype=torch.long, device=dev)
        prev = (self.draft_hidden if d.from_draft else self.hidden).index_select(0, src)
        self.draft_hidden = self.model.mtp(torch.tensor(d.token_ids, dtype=torch.long, device=dev),
                                           torch.tensor(d.positions, dtype=torch.long, device=dev), prev, meta)
        return self.draft_hidden

    def execute(self, batch: list[tuple[Request, int]], ep_counts=None, publish=None, kv_meta=None):
        """Run one step; returns {request_id: [(token, logprobs), ...]} for requests that sampled (one
        pair, or with speculative drafts one per draft and one after them).

        ``publish(model_input)`` sends the step to this DP rank's TP workers (and other stages) first.
        """
        return self.collect(self.launch(batch, ep_counts, publish, kv_meta))

    @torch.inference_mode()
    def launch(self, batch: list[tuple[Request, int]], ep_counts=None, publish=None, kv_meta=None) -> "StepInFlight":
        """Start a step: lay it out, publish it, run this rank's part of the forward. With pipeline stages the
        step's output rows come back from the last stage later (``collect``), so several steps may be in flight."""
        mi, sample_rows, sample_reqs = self.prepare(batch, ep_counts, kv_meta)
        prompt_rows = self.prompt_rows
        recv = None
        if self.stage is not None:
            mi.out_rows = [row for row, _, _ in prompt_rows] + sample_rows
            k = len(prompt_rows)
            prompt_rows = [(i, req, tok) for i, (_, req, tok) in enumerate(prompt_rows)]
            sample_rows = list(range(k, k + len(sample_rows)))
            if mi.out_rows:
                recv = self.stage.post_output_recv(len(mi.out_rows))
        if publish is not None:
            publish(mi)
        bitmask = fill_bitmask(sample_reqs, self.model_cfg.vocab_size)     # after every earlier token's accept
        hidden = self.forward(mi)
        sampled = (self._sample(hidden, sample_rows, sample_reqs, bitmask)
                   if self.stage is None and sample_reqs else None)
        return StepInFlight(hidden, recv, self.rows, prompt_rows, sample_rows, sample_reqs, bitmask, sampled)

    def _sample(self, hidden: torch.Tensor, rows: list[int], reqs: list, bitmask) -> tuple:
        """Sample on the device and start the tokens' copy to the host: (the copy, the raw logits of the rows
        that return logprobs, or None)."""
        logits = self.model.compute_logits(hidden[to_device(rows, torch.long, self.device)]).float()
        tokens = sample_tokens(logits, reqs, bitmask, self.kernels)
        self.last_tokens, self.last_index = tokens, {r.request_id: i for i, r in enumerate(reqs)}
        return HostCopy(tokens), logits if any(r.params.logprobs is not None for r in reqs) else None

    @torch.inference_mode()
    def collect(self, step: "StepInFlight") -> dict:
        """Finish a launched step: its output rows (from the last stage with PP), prompt logprobs, samples."""
        hidden = step.hidden
        if step.recv is not None:
            step.recv[0].wait()
            hidden = step.recv[1]
        elif self.stage is not None:
            hidden = hidden[:0]
        self.rows, self.prompt_rows = step.rows, step.prompt_rows
        self._prompt_logprobs(hidden)
        out: dict = {}
        if step.sample_reqs:
            copy, logits = step.sampled or self._sample(hidden, step.sample_rows, step.sample_reqs,
                                                        step.grammar_bitmask)
            tokens = copy.tolist()
            logprobs = sampled_logprobs(logits, step.sample_reqs, tokens) if logits is not None else [None] * len(tokens)
            for req, tok, lp in zip(step.sample_reqs, tokens, logprobs):
                out.setdefault(req.request_id, []).append((tok, lp))
        return out


class StepInFlight(msgspec.Struct):
    """A launched step: this rank's forward output, the pending receive of the last stage's rows (PP), and
    where each request's rows are."""

    hidden: object
    recv: object
    rows: list
    prompt_rows: list
    sample_rows: list
    sample_reqs: list
    grammar_bitmask: object = None      # the sampled rows' grammar bitmask (structured_output.Bitmask)
    sampled: object = None     # (HostCopy of the tokens, raw logits for logprobs) when sampled at launch
    prompt_tokens: int = 0     # prompt tokens the step computes (the engine core's count)
