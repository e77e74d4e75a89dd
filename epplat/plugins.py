"""The plugin manager: entry-point discovery, the registries, and platform choice."""

from __future__ import annotations

import functools
import logging
from typing import Optional

import pluggy

from epplat import hookspecs
from epplat.hookspecs import KINDS, Registration

logger = logging.getLogger(__name__)


class PluginError(ValueError):
    """A selection that cannot be served; its message is one line for the user."""


class Registry:
    """Every registration of every kind, collected from the ``epplat`` entry points."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        dists = {id(p): d.project_name for p, d in pm.list_plugin_distinfo()}
        self.by_kind: dict[str, dict[str, Registration]] = {k: {} for k in KINDS}
        for kind, spec in KINDS.items():
            hook = getattr(pm.hook, spec.hook)
            for impl in hook.get_hookimpls():
                for reg in impl.function() or []:
                    reg.kind = kind
                    reg.plugin = dists.get(id(impl.plugin), impl.plugin_name)
                    if reg.name in self.by_kind[kind]:
                        other = self.by_kind[kind][reg.name]
                        logger.warning("%s %r from %s shadows the one from %s",
                                       kind, reg.name, reg.plugin, other.plugin)
                    self.by_kind[kind][reg.name] = reg

    def names(self, kind: str) -> list[str]:
        return sorted(self.by_kind[kind])

    def get(self, kind: str, name: str, platform: Optional[str] = None) -> Registration:
        """The registration `name` of `kind`, usable here, or a one-line PluginError."""
        regs = self.by_kind[kind]
        if name not in regs:
            avail = ", ".join(self.names(kind)) or "none"
            raise PluginError(f"unknown {KINDS[kind].flag} {name!r}; available: {avail}")
        reg = regs[name]
        if platform and reg.platforms and platform not in reg.platforms:
            raise PluginError(f"{KINDS[kind].flag} {name!r} runs on {', '.join(reg.platforms)}, "
                              f"not on platform {platform!r}")
        why = reg.check()
        if why:
            raise PluginError(f"{KINDS[kind].flag} {name!r} is not usable here: {why}")
        return reg

    def load(self, kind: str, name: str, platform: Optional[str] = None):
        return self.get(kind, name, platform).load()

    def pick_platform(self, name: str = "auto") -> str:
        """Resolve ``--platform auto``: of the usable platforms, the one of the highest ``auto_priority``;
        on a tie epplat's own (an accelerator it drives before cpu), else a one-line PluginError."""
        if name != "auto":
            self.get("platform", name)
            return name
        usable = [r for r in self.by_kind["platform"].values() if r.check() is None]
        if not usable:
            raise PluginError("no usable platform found (not even cpu)")
        top = max(r.auto_priority for r in usable)
        best = sorted((r for r in usable if r.auto_priority == top), key=lambda r: r.name)
        builtin = [r for r in best if r.plugin == hookspecs.PROJECT]
        if builtin:
            return builtin[0].name
        if len(best) > 1:
            raise PluginError("--platform auto: " + ", ".join(f"{r.name!r} ({r.plugin})" for r in best)
                              + " all fit this machine equally; choose one with --platform")
        return best[0].name


@functools.lru_cache(maxsize=1)
def registry() -> Registry:
    """Load every plugin registered under the ``epplat`` entry-point group, once."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    from epplat.core.engine import graph
    if not pm.is_registered(graph):   # core's eager runner: every install has it, whatever its entry points say
        pm.register(graph, name="epplat")
    return Registry(pm)
