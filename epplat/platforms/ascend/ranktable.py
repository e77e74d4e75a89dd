"""The HCCL ranktable for prefill/decode disaggregation: build it from every node's devices, check one.

The file is the one vllm-ascend's ``gen_ranktable.py`` writes (version "1.2"): every
device of every node, nodes in ``--ips`` order, numbered by ``cluster_id`` from 1; the
first ``prefill_device_cnt`` devices are ``prefill_device_list``, the next
``decode_device_cnt`` ``decode_device_list``. Every value is a string, as HCCL and
LLMDataDist read them.
"""

from __future__ import annotations

import ipaddress
import json

VERSION = "1.2"
_A3_KEYS = ("super_pod_id", "super_device_id")


class RanktableError(ValueError):
    """A ranktable that cannot be built or does not check out; one line for the user."""


def build(nodes: list[tuple[str, list[dict]]], prefill: int, decode: int) -> dict:
    """nodes: [(server_id, devices), ...] in --ips order -> the ranktable dict."""
    devices = [{"server_id": server, **dev} for server, devs in nodes for dev in devs]
    if prefill + decode > len(devices):
        raise RanktableError(f"--prefill-device-cnt {prefill} + --decode-device-cnt {decode} exceeds the "
                             f"{len(devices)} devices of the {len(nodes)} node(s)")
    for i, dev in enumerate(devices):
        dev["cluster_id"] = str(i + 1)
    table = {"version": VERSION, "server_count": str(len(nodes)),
             "prefill_device_list": devices[:prefill],
             "decode_device_list": devices[prefill:prefill + decode],
             "status": "completed"}
    check(table)
    return table


def _ip(value, what: str) -> None:
    try:
        ipaddress.IPv4Address(value)
    except (ValueError, TypeError):
        raise RanktableError(f"{what} {value!r} is not an IPv4 address") from None


def _count(value, what: str) -> int:
    if not isinstance(value, str) or not value.isdigit():
        raise RanktableError(f"{what} must be a string of digits, not {value!r}")
    return int(value)


def check(table) -> str:
    """Validate a ranktable dict; returns a one-line summary or raises RanktableError."""
    if not isinstance(table, dict):
        raise RanktableError("the ranktable must be a JSON object")
    keys = {"version", "server_count", "prefill_device_list", "decode_device_list", "status"}
    if set(table) != keys:
        missing, extra = sorted(keys - set(table)), sorted(set(table) - keys)
        raise RanktableError("ranktable keys: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(extra)}"] if extra else [])))
    if table["version"] != VERSION:
        raise RanktableError(f"version is {table['version']!r}, expected {VERSION!r}")
    if table["status"] != "completed":
        raise RanktableError(f"status is {table['status']!r}, expected 'completed'")
    servers_declared = _count(table["server_count"], "server_count")
    devices = []
    for name in ("prefill_device_list", "decode_device_list"):
        if not isinstance(table[name], list):
            raise RanktableError(f"{name} must be a list")
        devices += [(name, i, d) for i, d in enumerate(table[name])]
    if not devices:
        raise RanktableError("the ranktable lists no device")
    a3 = isinstance(devices[0][2], dict) and "super_pod_id" in devices[0][2]
    want = {"server_id", "device_id", "device_ip", "cluster_id"} | (set(_A3_KEYS) if a3 else set())
    seen_dev, seen_ip, cluster_ids, servers = set(), set(), [], []
    for name, i, d in devices:
        where = f"{name}[{i}]"
        if not isinstance(d, dict) or set(d) != want:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise RanktableError(f"{where} has keys {got}, expected {sorted(want)}"
                                 + (" (every device of an A3 ranktable has super_pod_id and super_device_id)"
                                    if a3 or (isinstance(d, dict) and "super_pod_id" in d) else ""))
        _ip(d["server_id"], f"{where}.server_id")
        _ip(d["device_ip"], f"{where}.device_ip")
        dev_id = _count(d["device_id"], f"{where}.device_id")
        cluster_ids.append(_count(d["cluster_id"], f"{where}.cluster_id"))
        for k in _A3_KEYS if a3 else ():
            _count(d[k], f"{where}.{k}")
        if (d["server_id"], dev_id) in seen_dev:
            raise RanktableError(f"{where}: device {dev_id} of server {d['server_id']} is listed twice")
        if d["device_ip"] in seen_ip:
            raise RanktableError(f"{where}: device_ip {d['device_ip']} is listed twice")
        seen_dev.add((d["server_id"], dev_id))
        seen_ip.add(d["device_ip"])
        if d["server_id"] not in servers:
            servers.append(d["server_id"])
    if cluster_ids != list(range(cluster_ids[0], cluster_ids[0] + len(cluster_ids))) or cluster_ids[0] != 1:
        raise RanktableError(f"cluster_id must run 1, 2, 3, ... over the prefill then the decode devices; "
                             f"found {', '.join(map(str, cluster_ids[:8]))}{', ...' if len(cluster_ids) > 8 else ''}")
    if len(servers) > servers_declared:
        raise RanktableError(f"server_count is {servers_declared} but the devices are on {len(servers)} servers")
    return (f"{servers_declared} server(s), {len(table['prefill_device_list'])} prefill and "
            f"{len(table['decode_device_list'])} decode device(s){', A3 super pod' if a3 else ''}")


def load(path: str) -> dict:
    """The ranktable at `path`, checked (what the LLMDataDist KV connector reads, from
    DISAGGREGATED_PREFILL_RANK_TABLE_PATH); RanktableError with one line otherwise."""
    try:
        with open(path) as f:
            table = json.load(f)
    except OSError as e:
        raise RanktableError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise RanktableError(f"{path} is not valid JSON: {e}") from None
    check(table)
    return table


def check_file(path: str) -> str:
    return check(load(path))
