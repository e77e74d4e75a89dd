"""`vllm serve` flags for concepts epplat does not have (yet), so that vLLM command lines run unchanged.

Each flag is accepted when its value changes nothing about what is served (one info line says
how epplat reads it) and refused with one line naming the unsupported value when it would; nothing
that a later piece of work implements (dual batch overlap, tool calling,
fp8 KV cache...) is faked here."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

from epplat.config import ConfigError

logger = logging.getLogger("epplat.serve")

@dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]
    kind: type                                  # bool (a switch), str, int or dict (JSON)
    accepts: Callable[[object, argparse.Namespace], bool]
    note: str                                   # accepted: how epplat reads it
    refusal: str                                # refused: what is unsupported
    effect: Optional[Callable[[], None]] = None  # accepted: what it changes (vLLM's meaning, where epplat has it)

    @property
    def dest(self) -> str:
        return self.names[0].lstrip("-").replace("-", "_")


def _is(*values):
    return lambda v, _args: v in values


def _always(_v, _args) -> bool:
    return True


def _never(_v, _args) -> bool:
    return False


FLAGS = (
    Flag(("--trust-remote-code",), bool, _always, "epplat runs its own implementation of the architectures it "
         "serves (no checkpoint code is run)", ""),
    Flag(("--data-parallel-hybrid-lb",), bool, _never, "", "hybrid DP load balancing is not implemented in "
         "epplat (internal: one API server for all ranks; external: --data-parallel-rank per engine)"),
    Flag(("--data-parallel-external-lb",), bool, lambda _v, a: a.data_parallel_rank is not None,
         "epplat balances externally whenever --data-parallel-rank is given",
         "epplat's external load balancing is one engine per --data-parallel-rank; give it"),
    Flag(("--expert-placement-strategy",), str, _is("linear"), "contiguous experts per EP rank, as epplat "
         "places them", "only linear expert placement is implemented in epplat"),
    Flag(("--tokenizer-mode",), str, _is("auto", "hf"), "transformers' tokenizer",
         "only the auto / hf tokenizer modes exist in epplat"),
    Flag(("--kv-cache-dtype",), str, _is("auto"), "the KV cache in the model's dtype",
         "a KV cache dtype other than the model's (auto) is not implemented in epplat yet"),
    Flag(("--load-format",), str, _is("auto", "safetensors"), "weights read from the safetensors files",
         "epplat loads safetensors checkpoints only (auto / safetensors)"),
    Flag(("--disable-log-stats",), bool, _always, "no periodic stats line from the engines; /metrics is unchanged",
         "", lambda: os.environ.__setitem__("EPPLAT_LOG_STATS_INTERVAL", "inf")),
    Flag(("--disable-log-requests",), bool, _always, "epplat does not log requests", ""),
    Flag(("--enable-log-requests",), bool, _never, "", "request logging is not implemented in epplat"),
    Flag(("--disable-uvicorn-access-log",), bool, _always, "set --uvicorn-log-level warning to hide it", ""),
    Flag(("--enable-server-load-tracking",), bool, _always, "epplat's /load always counts requests", ""),
    Flag(("--compilation-config", "-O"), str, _always, "epplat compiles nothing; CUDA graphs follow "
         "--enforce-eager", ""),
    Flag(("--enable-dbo",), bool, _never, "", "dual batch overlap is not implemented in epplat yet"),
    Flag(("--swap-space",), str, _always, "epplat preempts by recomputation, never swapping", ""),
    Flag(("--enable-lora",), bool, _never, "", "LoRA adapters are not implemented in epplat"),
    Flag(("--revision",), str, _never, "", "epplat serves a local checkpoint folder (no hub revisions)"),
    Flag(("--hf-overrides",), str, lambda v, _a: v.strip() in ("{}", ""), "nothing to override",
         "config overrides are not implemented in epplat"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags, on `epplat serve`'s parser (defaults absent, so that only flags given are checked)."""
    group = p.add_argument_group("vLLM flags without an epplat concept (accepted only where they change nothing)")
    for f in FLAGS:
        if f.kind is bool:
            group.add_argument(*f.names, dest=f.dest, action="store_true", default=argparse.SUPPRESS)
        else:
            group.add_argument(*f.names, dest=f.dest, type=int if f.kind is int else str, default=argparse.SUPPRESS)
    # vLLM's positive spelling of what epplat has as --no-enable-chunked-prefill
    p.add_argument("--enable-chunked-prefill", dest="enable_chunked_prefill", action="store_true",
                   help=argparse.SUPPRESS)


def check(args: argparse.Namespace) -> None:
    """One info line per accepted flag given; ConfigError naming the first refused one."""
    for f in FLAGS:
        if not hasattr(args, f.dest):
            continue
        value = getattr(args, f.dest)
        shown = f.names[0] if f.kind is bool else f"{f.names[0]} {value}"
        if not f.accepts(value, args):
            raise ConfigError(f"{shown}: {f.refusal}")
        logger.info("%s: accepted (%s)", shown, f.note)
        if f.effect is not None:
            f.effect()
