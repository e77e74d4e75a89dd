"""torchair's multistream options for DeepSeek (``torchair_graph_config.enable_multistream_mla`` /
``enable_multistream_moe``), as vllm-ascend applies them in graph mode.

- ``enable_multistream_moe``: the shared experts run on a second stream ("moe_secondary"),
  beside the routed experts' dispatch, GEMMs and combine;
- ``enable_multistream_mla``: MLA's query path (q projections and the query's rotary) runs on
  a second stream ("mla_secondary"), beside the latent's projection, norm and cache write.

Each is a ``side_stream`` record field: ``(first, *deps) -> context manager``; the ops inside
run on the tagged stream after waiting for ``deps`` (torchair.scope's npu_stream_switch and
npu_wait_tensor, which act inside torchair graphs).
"""

from __future__ import annotations

import contextlib


def _scope():
    try:
        from torchair.scope import npu_stream_switch, npu_wait_tensor
    except ImportError:            # older torchair releases kept them in torchair.ops
        from torchair.ops import NpuStreamSwitch as npu_stream_switch
        from torchair.ops import npu_wait_tensor
    return npu_stream_switch, npu_wait_tensor


def side_stream(tag: str):
    """A context-manager factory: ``with side(x, *deps):`` runs its ops on stream `tag` after deps."""
    switch, wait = _scope()

    @contextlib.contextmanager
    def side(first, *deps):
        with switch(tag, 0):
            for d in deps:
                wait(first, d)
            yield
    return side
