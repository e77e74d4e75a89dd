"""Every pluggy hook specification of epplat, in one file.

A plugin is any module registered under the ``epplat`` entry-point group (the
built-in platforms register exactly like third-party packages). Each kind's hook returns
a list of :class:`Registration` records; the engine looks implementations up by name
(from a flag) or asks the platform for its default. A registration imports nothing
heavy: ``load`` is called only when the implementation is selected, and ``check``
says in a few words why it is unusable here (``None`` when it is usable).
``epplat_cli_commands`` is the one hook that is not a kind: it adds ``epplat`` subcommands.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import pluggy

PROJECT = "epplat"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)



@dataclass(frozen=True)
class Kind:
    """One kind of plugin: the hook that lists its registrations, what a user calls it in an
    error line (the flag that selects it), and its heading in ``epplat plugins``."""

    hook: str
    flag: str
    title: str


# every kind of plugin, in the order `epplat plugins` lists them: the one table of kinds
KINDS = {
    "platform": Kind("epplat_platforms", "--platform", "platforms"),
    "all2all": Kind("epplat_all2all_backends", "--all2all-backend", "all2all backends"),
    "graph_runner": Kind("epplat_graph_runners", "graph runner", "graph runners"),
    "quantization": Kind("epplat_quantization_methods", "--quantization", "quantization methods"),
    "kv_connector": Kind("epplat_kv_connectors", "kv_connector", "KV connectors"),
    "eplb_policy": Kind("epplat_eplb_policies", "eplb policy", "EPLB policies"),
    "tool_parser": Kind("epplat_tool_parsers", "--tool-call-parser", "tool-call parsers"),
    "reasoning_parser": Kind("epplat_reasoning_parsers", "--reasoning-parser", "reasoning parsers"),
}


@dataclass
class Registration:
    """One named implementation of a capability.

    name:      what users type (``--all2all-backend NAME``, ``--platform NAME``...).
    load:      returns the implementation (a class or factory); imports lazily.
    check:     returns None when usable here, else a short reason ("torch_npu not installed").
    platforms: platform names it runs on; empty means every platform.
    help:      one line for ``epplat plugins``.
    auto_priority: platforms only: how well the platform fits a machine where ``check()`` passes, for
               ``--platform auto``: 0 runs anywhere (cpu, and by default a plugin's platform), 1 drives an
               accelerator found here (cuda, ascend). The highest wins; epplat's own platform wins a tie,
               so a plugin's platform is picked over a built-in one only when it says it fits better.
    """

    name: str
    load: Callable[[], object]
    check: Callable[[], Optional[str]] = lambda: None
    platforms: tuple = ()
    help: str = ""
    auto_priority: int = 0
    kind: str = field(default="", compare=False)
    plugin: str = field(default="", compare=False)


@hookspec
def epplat_platforms() -> list[Registration]:
    """Accelerator platforms.

    ``load()`` returns a :class:`epplat.platforms.interface.Platform` subclass: device
    type, torch.distributed backend (gloo / nccl / hccl), device setup, memory query
    and the platform's default all2all backend and graph runner. ``check()`` is the
    availability test used by ``--platform auto``, which picks the usable platform of the highest
    ``auto_priority`` (epplat's own on a tie).
    """


@hookspec
def epplat_all2all_backends() -> list[Registration]:
    """Expert-parallel token exchange for MoE layers.

    ``load()`` returns a :class:`epplat.core.moe.all2all.All2AllBackend` subclass,
    constructed per MoE layer group with the EP process group and expert map. It
    provides ``dispatch(hidden, topk_ids, topk_weights)`` -> tokens for this rank's
    experts and ``combine(expert_out)`` -> hidden states in the original token order.
    """


@hookspec
def epplat_graph_runners() -> list[Registration]:
    """Graph capture of decode steps.

    ``load()`` returns a :class:`epplat.core.engine.graph.GraphRunner` subclass that
    captures the model's decode forward for a set of batch sizes and replays it.
    ``eager`` (no capture) is what ``--enforce-eager`` selects.
    """


@hookspec
def epplat_quantization_methods() -> list[Registration]:
    """Quantization schemes selected with ``--quantization NAME``.

    ``load()`` returns a :class:`epplat.core.model.quant.QuantMethod` subclass that
    turns checkpoint tensors into the weights a layer keeps and runs the GEMMs
    (dense and expert) for that scheme.
    """


@hookspec
def epplat_kv_connectors() -> list[Registration]:
    """KV-cache transfer for prefill/decode disaggregation (``--kv-transfer-config``).

    ``load()`` returns a subclass of ``epplat.connectors.base.KVConnectorBase``: a
    scheduler side (which blocks to fetch or hold) and a worker side (moving KV blocks).
    """


@hookspec
def epplat_eplb_policies() -> list[Registration]:
    """Expert-parallel load-balancing policies (``--eplb-config '{"policy": NAME}'``).

    ``load()`` returns a function ``(weight, num_replicas, num_groups, num_nodes,
    num_gpus) -> (phy2log, log2phy, logcnt)`` computing a new expert placement from
    per-expert load ``weight`` [MoE layers, logical experts] (the tokens each expert got
    over the last window, summed over the EP group). ``phy2log`` [layers, num_replicas]
    names the logical expert of each physical slot, slots numbered GPU by GPU; epplat
    derives the routing tables from it and moves only the experts whose slot changes.
    A policy that declares a keyword ``old_phy2log`` also gets the current placement,
    to weigh migration cost. It runs on EP rank 0, whose result every rank adopts.
    """


@hookspec
def epplat_tool_parsers() -> list[Registration]:
    """Tool-call formats (``--tool-call-parser NAME``).

    ``load()`` returns a subclass of ``epplat.core.server.tool_parsers.base.ToolParser``: where a
    model's tool calls begin in its answer and the complete calls from there on.
    """


@hookspec
def epplat_reasoning_parsers() -> list[Registration]:
    """Reasoning formats (``--reasoning-parser NAME``).

    ``load()`` returns a factory of an object with ``split(text) -> (reasoning, content)`` and
    ``stream()`` (an object whose ``feed(delta, final)`` returns the deltas of both), as
    ``epplat.core.server.reasoning_parsers.ThinkParser``.
    """


@hookspec
def epplat_cli_commands(subparsers) -> None:
    """Add ``epplat`` subcommands (as ``llm``'s ``register_commands``).

    ``subparsers`` is the argparse sub-parser action of the ``epplat`` command: call
    ``subparsers.add_parser(NAME, help=...)``, add its arguments and
    ``set_defaults(func=run)``, where ``run(args) -> int`` is the exit status. Import
    what the command needs inside ``run``: every ``epplat`` invocation builds the parser.
    The ascend plugin adds ``epplat ranktable`` this way.
    """
