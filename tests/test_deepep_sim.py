"""The DeepEP all2all backends (epplat/platforms/cuda/all2all_deepep.py) on a *simulation* of
``deep_ep`` (tests/simulations/deepep: DeepEP's Buffer API over gloo, no GPU): two EP ranks as real
processes, uneven and empty batches; dispatch -> this rank's experts -> combine must equal all
experts computed locally. The simulation asserts what DeepEP asserts (its EP-size configs, the
low-latency hidden sizes, the NVSHMEM queue-pair depth, one live low-latency buffer) and leaves
garbage (NaN) in unused receive slots. A prefill-sized step (300 tokens on a rank, past the
low-latency capacity) goes through the normal kernels; hidden 64 and an EP size of 1 are
refused in one line naming DeepEP's sets. The real package runs only on GPUs; this checks how
the backends use its API, not the kernels."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from server_utils import free_port


def _rank(rank, world, port, name, errors):
    try:
        import torch.distributed as dist
        import torch.nn.functional as F

        import deep_ep
        from epplat.config import ConfigError
        from epplat.core.moe.all2all import ExpertMap
        from epplat.core.moe.experts import reference_experts
        from epplat.platforms.cuda import all2all_deepep
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        emap = ExpertMap(8, rank, world)
        backend = getattr(all2all_deepep, name)(emap, group=dist.group.WORLD, device=torch.device("cpu"))
        g = torch.Generator().manual_seed(0)
        hidden = 2048                 # a size DeepEP's low-latency kernels are built for
        w13 = (torch.randn(8, hidden, 96, generator=g) / 45).bfloat16()
        w2 = (torch.randn(8, 48, hidden, generator=g) / 7).bfloat16()
        mine = slice(emap.local_ids.start, emap.local_ids.stop)
        for tokens in ((5, 9), (0, 3), (300, 260), (12, 12)):     # 300: a prefill past the low-latency capacity
            t = tokens[rank]
            backend.set_step_tokens(list(tokens))
            x = torch.randn(t, hidden).bfloat16()
            ids = torch.rand(t, 8).topk(2, dim=-1).indices
            w = torch.softmax(torch.randn(t, 2), -1).bfloat16()
            recv = backend.dispatch(x, ids, w)
            y = reference_experts(recv.x, recv.topk_ids, recv.topk_weights, w13[mine], w2[mine], F.silu) \
                if recv.x.shape[0] else recv.x
            if name == "DeepEPLowLatency" and max(tokens) <= backend.cap:
                # unused receive slots hold garbage (NaN in the simulation), which no expert may read
                assert bool(recv.x.isnan().any()), "the simulation left no garbage in unused slots"
            out = backend.combine(y)
            assert out.shape == (t, hidden) and bool(out.isfinite().all())
            if t:
                torch.testing.assert_close(out.float(), reference_experts(x, ids, w, w13, w2, F.silu).float(),
                                           atol=2e-2, rtol=2e-2)
        made = [c[1]["low_latency_mode"] for c in deep_ep.calls if c[0] == "Buffer"]
        # one buffer each; the low-latency backend's prefill steps made the normal kernels' buffer
        assert made == ([True, False] if name == "DeepEPLowLatency" else [False]), made
        if name == "DeepEPLowLatency":
            lowlat = [c[1]["tokens"] for c in deep_ep.calls if c[0] == "low_latency_dispatch"]
            assert lowlat == [(5, 9)[rank], (0, 3)[rank], 12], lowlat
            assert [c[1]["tokens"] for c in deep_ep.calls if c[0] == "dispatch"] == [(300, 260)[rank]]
        try:
            backend.dispatch(torch.randn(2, hidden), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2))
            raise AssertionError("float32 activations were accepted")
        except ConfigError as e:
            assert "bfloat16" in str(e)
        if name == "DeepEPLowLatency":      # a fresh backend: its hidden size is checked before a buffer is made
            other = getattr(all2all_deepep, name)(emap, group=dist.group.WORLD, device=torch.device("cpu"))
            try:
                other.dispatch(torch.randn(2, 64).bfloat16(), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2))
                raise AssertionError("hidden 64 was accepted")
            except ConfigError as e:
                assert "hidden sizes [2048, 2560" in str(e) and "not 64" in str(e) and "\n" not in str(e), e
        alone = dist.new_group([0]), dist.new_group([1])
        try:
            getattr(all2all_deepep, name)(ExpertMap(8), group=alone[rank], device=torch.device("cpu"))
            raise AssertionError("an EP size of 1 was accepted")
        except ConfigError as e:
            assert "supports EP sizes [2, 4, 8, 16" in str(e) and "not 1" in str(e), e
        dist.barrier()      # rank 0 hosts the store: it must not leave while rank 1 still forms its groups there
        dist.destroy_process_group()
    except Exception as e:   # reported to the parent, which fails the test with it
        import traceback
        errors.put(f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")


@pytest.mark.parametrize("name", ["DeepEPHighThroughput", "DeepEPLowLatency"])
def test_deepep_backend_on_a_simulated_deep_ep(name, simulation):
    simulation("deepep")
    port = free_port()
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, name, errors)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert not failures and all(p.exitcode == 0 for p in procs), "\n".join(failures)


def test_deepep_limits_are_one_line_and_the_simulation_keeps_one_low_latency_buffer(simulation):
    """What DeepEP (commit 567632d) cannot run is refused in one line before any buffer is made: top-k above 11
    in the low-latency kernels, an EP size its config maps lack, and the low-latency backend above 8 ranks
    (its prefill kernels would initialise NVSHMEM a second time). The EP sizes come from torch's "fake"
    process group (one process standing for 16 ranks; nothing is exchanged). The SIMULATED deep_ep asserts,
    as DeepEP, that a process holds one live low-latency buffer."""
    simulation("deepep")
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import deep_ep
    from epplat.config import ConfigError
    from epplat.core.moe.all2all import ExpertMap
    from epplat.platforms.cuda.all2all_deepep import DeepEPHighThroughput, DeepEPLowLatency
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=16)
    try:
        cpu = torch.device("cpu")
        two, six = dist.new_group([0, 1]), dist.new_group(list(range(6)))
        low = DeepEPLowLatency(ExpertMap(16, 0, 2), group=two, device=cpu)
        made = len(deep_ep.calls)
        x = torch.zeros(2, 2048, dtype=torch.bfloat16)
        with pytest.raises(ConfigError, match=r"^--all2all-backend deepep_low_latency: DeepEP's low-latency kernels "
                                              r"take top-k up to 11, not 12$"):
            low.dispatch(x, torch.zeros(2, 12, dtype=torch.long), torch.ones(2, 12))
        assert low.buffer is None and len(deep_ep.calls) == made
        with pytest.raises(ConfigError, match=r"runs prefill through DeepEP's normal kernels, which need NVSHMEM of "
                                              r"their own above 8 ranks; EP size 16: use deepep_high_throughput$"):
            DeepEPLowLatency(ExpertMap(32, 0, 16), group=dist.group.WORLD, device=cpu)
        assert DeepEPHighThroughput(ExpertMap(32, 0, 16), group=dist.group.WORLD, device=cpu).size == 16
        for cls in (DeepEPHighThroughput, DeepEPLowLatency):
            with pytest.raises(ConfigError, match=r"DeepEP supports EP sizes \[2, 4, 8, 16, .*\], not 6$"):
                cls(ExpertMap(12, 0, 6), group=six, device=cpu)
        first = deep_ep.Buffer(two, 0, 1 << 20, low_latency_mode=True)
        with pytest.raises(AssertionError, match="already live"):
            deep_ep.Buffer(two, 0, 1 << 20, low_latency_mode=True)
        first.destroy()
        deep_ep.Buffer(two, 0, 1 << 20, low_latency_mode=True).destroy()     # once the first is gone
    finally:
        dist.destroy_process_group()
