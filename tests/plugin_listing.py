"""Parses ``epplat plugins`` output into name -> (plugin package, exact status), so that tests
compare a status with ``== "usable"`` (a substring test passes on "unusable: ...")."""

from __future__ import annotations

import re


def plugin_statuses(listing: str) -> dict[str, tuple[str, str]]:
    out = {}
    for line in listing.splitlines():
        parts = line.split(None, 2)
        if not line.startswith("  ") or len(parts) < 3 or parts[0].startswith("("):
            continue
        status = re.sub(r" \[[^\]]*\]$", "", parts[2])
        if status == "usable" or status.startswith("unusable: "):
            out[parts[0]] = (parts[1], status)
    return out
