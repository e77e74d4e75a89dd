"""``epplat plugins``: every registered implementation, where it came from, and if it is usable."""

from __future__ import annotations

from epplat.hookspecs import KINDS
from epplat.plugins import registry

def add_cli(sub) -> None:
    p = sub.add_parser("plugins", help="list registered platforms, backends and policies")
    p.set_defaults(func=run)


def run(args) -> int:
    reg = registry()
    for kind, spec in KINDS.items():
        print(f"{spec.title}:")
        regs = reg.by_kind[kind]
        if not regs:
            print("  (none registered)")
        for name in sorted(regs):
            r = regs[name]
            try:
                why = r.check()
            except Exception as e:  # a broken plugin must not break the listing
                why = f"check failed: {e}"
            status = "usable" if why is None else f"unusable: {why}"
            where = f" [{', '.join(r.platforms)}]" if r.platforms else ""
            print(f"  {name:<26} {r.plugin:<22} {status}{where}")
            if r.help:
                print(f"  {'':<26} {r.help}")
    return 0
