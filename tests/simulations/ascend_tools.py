"""Fake `npu-smi` and `hccn_tool` executables that print what the real Ascend driver tools print.

Output formats follow the tools' documented output (Ascend HDK npu-smi / hccn_tool
references): ``npu-smi info -l`` lists "NPU ID" / "Chip Count" blocks under "Total
Count"; ``hccn_tool -i N -ip -g`` prints ``ipaddr:`` / ``netmask:`` lines (Atlas 800
A2, 910B); on Atlas A3 super-pod nodes every NPU has two chips, ``hccn_tool -i N -vnic
-g`` prints ``vnic link status / vnic ipaddr / vnic netmask`` and ``npu-smi info -t
spod-info -i N -c C`` prints SDID, Super Pod Size, Super Pod ID, Server Index. What a
910B's npu-smi prints for ``spod-info`` (unsupported there) is our stand-in: an error
line and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

_SCRIPT = r'''#!{python}
import json, sys
spec = json.load(open({spec!r}))
args = sys.argv[1:]
def kv(key, value):
    print("\t" + key.ljust(31) + ": " + str(value))
if {tool!r} == "npu-smi":
    if args == ["info", "-l"]:
        kv("Total Count", len(spec["npus"]))
        for npu in spec["npus"]:
            print()
            kv("NPU ID", npu)
            kv("Chip Count", spec["chips"])
        sys.exit(0)
    if args[:3] == ["info", "-t", "spod-info"] and len(args) == 7:
        npu, chip = int(args[4]), int(args[6])
        if spec["kind"] != "a3":
            print("This device does not support querying spod-info.")
            sys.exit(255)
        kv("SDID", spec["sdid_base"] + npu * spec["chips"] + chip)
        kv("Super Pod Size", 384)
        kv("Super Pod ID", spec["super_pod_id"])
        kv("Server Index", spec["server_index"])
        sys.exit(0)
else:
    if len(args) == 4 and args[0] == "-i" and args[3] == "-g":
        dev = int(args[1])
        if dev >= len(spec["npus"]) * spec["chips"] or dev in spec.get("no_ip", []):
            print("dev_id[%d] is invalid." % dev if dev >= len(spec["npus"]) * spec["chips"] else "ipaddr:")
            sys.exit(255 if dev >= len(spec["npus"]) * spec["chips"] else 0)
        ip = spec["ip_prefix"] + str(spec["ip_start"] + dev)
        if args[2] == "-ip" and spec["kind"] != "a3":
            print("ipaddr:" + ip)
            print("netmask:255.255.0.0")
            sys.exit(0)
        if args[2] == "-vnic" and spec["kind"] == "a3":
            print("vnic link status: UP")
            print("vnic ipaddr: " + ip)
            print("vnic netmask: 255.255.255.0")
            sys.exit(0)
print("Invalid command: " + " ".join(args), file=sys.stderr)
sys.exit(1)
'''


def install(directory: Path, kind: str = "910b", npus: int = 8, ip_prefix: str = "29.7.0.", ip_start: int = 1,
            super_pod_id: int = 0, server_index: int = 0, no_ip: tuple = ()) -> Path:
    """Write `npu-smi` and `hccn_tool` for one node into `directory`; returns it (put it first on PATH)."""
    directory.mkdir(parents=True, exist_ok=True)
    chips = 2 if kind == "a3" else 1
    spec = {"kind": kind, "npus": list(range(npus)), "chips": chips, "ip_prefix": ip_prefix, "ip_start": ip_start,
            "super_pod_id": super_pod_id, "server_index": server_index, "sdid_base": 0x6000000 + server_index * 64,
            "no_ip": list(no_ip)}
    spec_path = directory / "spec.json"
    spec_path.write_text(json.dumps(spec))
    for tool in ("npu-smi", "hccn_tool"):
        path = directory / tool
        path.write_text(_SCRIPT.format(python=sys.executable, spec=str(spec_path), tool=tool))
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return directory


def env_with(directory: Path, **extra) -> dict:
    """os.environ with `directory` first on PATH (and no HCCN_TOOL_PATH unless given)."""
    env = {k: v for k, v in os.environ.items() if k != "HCCN_TOOL_PATH"}
    env["PATH"] = f"{directory}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env
