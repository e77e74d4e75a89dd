"""This node's Ascend devices, as the driver tools report them (`npu-smi`, `hccn_tool`).

Device ids follow vllm-ascend's generator: ``npu_id * chips_per_npu + chip``. The
device IP is ``hccn_tool -i ID -ip -g`` (Atlas 800 A2 / 910B) or, on Atlas A3 super
pods, ``hccn_tool -i ID -vnic -g`` plus ``SDID`` / ``Super Pod ID`` from ``npu-smi
info -t spod-info``. A node is taken for an A3 super-pod node when ``spod-info``
answers with an SDID for its first chip. ``HCCN_TOOL_PATH`` overrides hccn_tool's path.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess

HCCN_TOOL_PATHS = ("/usr/local/Ascend/driver/tools/hccn_tool", "/usr/bin/hccn_tool")


class ToolError(RuntimeError):
    """A driver tool is missing, failed, or printed something we cannot read; one line."""


def hccn_tool() -> str:
    if os.environ.get("HCCN_TOOL_PATH"):
        return os.environ["HCCN_TOOL_PATH"]
    for path in HCCN_TOOL_PATHS:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("hccn_tool") or "hccn_tool"


def run(cmd: list[str], check: bool = True) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ToolError(f"{cmd[0]} not found (install the Ascend driver, or set HCCN_TOOL_PATH for hccn_tool)") \
            from None
    except subprocess.TimeoutExpired:
        raise ToolError(f"`{' '.join(cmd)}` did not answer within 60 s") from None
    if check and r.returncode != 0:
        said = (r.stderr.strip() or r.stdout.strip() or "no output").splitlines()[0]
        raise ToolError(f"`{' '.join(cmd)}` failed with exit code {r.returncode}: {said}")
    return r.stdout


def fields(text: str) -> list[tuple[str, str]]:
    """'Key   : value' lines (npu-smi) and 'key:value' lines (hccn_tool) as (key, value) pairs."""
    out = []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            out.append((key.strip(), value.strip()))
    return out


def field(text: str, key: str, cmd: str) -> str:
    for k, v in fields(text):
        if k == key:
            return v
    raise ToolError(f"`{cmd}` printed no '{key}' line")


def parse_npu_list(text: str) -> list[tuple[int, int]]:
    """`npu-smi info -l` -> [(npu_id, chip_count), ...] in the order listed."""
    cards, npu = [], None
    for k, v in fields(text):
        try:
            if k == "NPU ID":
                npu = int(v)
            elif k == "Chip Count" and npu is not None:
                cards.append((npu, int(v)))
                npu = None
        except ValueError:
            raise ToolError(f"`npu-smi info -l` printed {k} {v!r}, not a number") from None
    if not cards:
        raise ToolError("`npu-smi info -l` lists no NPU (no 'NPU ID' / 'Chip Count' lines)")
    return cards


def _ipv4(value: str, cmd: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ToolError(f"`{cmd}` printed {value!r}, not an IPv4 address (is the device NIC configured?)") from None


def _number(value: str, key: str, cmd: str) -> str:
    if not value.isdigit():
        raise ToolError(f"`{cmd}` printed {key} {value!r}, not a number")
    return value


def spod_info(npu: int, chip: int, check: bool = True) -> str:
    return run(["npu-smi", "info", "-t", "spod-info", "-i", str(npu), "-c", str(chip)], check=check)


def is_super_pod(npu: int) -> bool:
    """True on Atlas A3 super-pod nodes: their first chip reports an SDID."""
    return any(k == "SDID" for k, _ in fields(spod_info(npu, 0, check=False)))


def local_devices() -> list[dict]:
    """Every device of this node: {device_id, device_ip[, super_pod_id, super_device_id]}, as strings."""
    cards = parse_npu_list(run(["npu-smi", "info", "-l"]))
    a3 = is_super_pod(cards[0][0])
    tool = hccn_tool()
    devices = []
    for npu, chips in cards:
        for chip in range(chips):
            dev = npu * chips + chip
            if a3:
                cmd = f"hccn_tool -i {dev} -vnic -g"
                ip = _ipv4(field(run([tool, "-i", str(dev), "-vnic", "-g"]), "vnic ipaddr", cmd), cmd)
                spod_cmd = f"npu-smi info -t spod-info -i {npu} -c {chip}"
                spod = spod_info(npu, chip)
                devices.append({"device_id": str(dev), "device_ip": ip,
                                "super_pod_id": _number(field(spod, "Super Pod ID", spod_cmd), "Super Pod ID",
                                                        spod_cmd),
                                "super_device_id": _number(field(spod, "SDID", spod_cmd), "SDID", spod_cmd)})
            else:
                cmd = f"hccn_tool -i {dev} -ip -g"
                ip = _ipv4(field(run([tool, "-i", str(dev), "-ip", "-g"]), "ipaddr", cmd), cmd)
                devices.append({"device_id": str(dev), "device_ip": ip})
    return devices
