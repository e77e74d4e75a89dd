"""``epplat ranktable``: generate the HCCL ranktable on every node, or ``--check FILE``.

Run the same command on every node (vllm-ascend's ``gen_ranktable.sh`` arguments). Each
node reads its devices with npu-smi / hccn_tool; the nodes meet at the first IP of
``--ips`` (``--master-port``); the first node builds the table and sends it back, and
every node writes it to ``--output``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys

from epplat.platforms.ascend import npu_tools, rendezvous
from epplat.platforms.ascend.ranktable import RanktableError, build, check_file


def _int(lo: int, hi: int | None = None):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{s!r} is out of range [{lo}, {hi if hi is not None else 'inf'}]")
        return v
    parse.__name__ = "integer"
    return parse


def _seconds(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number of seconds") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"{s!r} must be > 0")
    return v


def add_cli(sub) -> None:
    p = sub.add_parser("ranktable", help="generate (on every node) or check the HCCL ranktable for PD disaggregation",
                       description="Generate the HCCL ranktable for prefill/decode disaggregation on Ascend: run "
                                   "the same command on every node. Or check an existing one with --check FILE.")
    p.add_argument("--ips", nargs="+", metavar="IP", help="one IP per node, prefill nodes first")
    p.add_argument("--npus-per-node", type=_int(1), default=None,
                   help="devices each node contributes (default: every device npu-smi lists)")
    p.add_argument("--network-card-name", metavar="NIC", default=None,
                   help="the host NIC carrying --ips (checked to exist; use it for HCCL/GLOO_SOCKET_IFNAME)")
    p.add_argument("--prefill-device-cnt", type=_int(0), default=None)
    p.add_argument("--decode-device-cnt", type=_int(0), default=None)
    p.add_argument("--node-rank", type=_int(0), default=None,
                   help="this node's index in --ips (default: the one of --ips that is a local address)")
    p.add_argument("--master-port", type=_int(1, 65535), default=6657, help="rendezvous port on the first node")
    p.add_argument("--timeout", type=_seconds, default=300.0, help="seconds to wait for every node to join")
    p.add_argument("--output", default="ranktable.json")
    p.add_argument("--check", metavar="FILE", default=None, help="validate an existing ranktable and exit")
    p.set_defaults(func=run)


def _fail(msg: str) -> int:
    print(f"epplat ranktable: error: {msg}", file=sys.stderr)
    return 1


def run(args) -> int:
    try:
        if args.check:
            if args.ips or args.prefill_device_cnt is not None or args.decode_device_cnt is not None:
                raise RanktableError("--check FILE validates a ranktable; give it without --ips and the counts")
            print(f"{args.check}: ok: {check_file(args.check)}")
            return 0
        rank = _validate(args)
        table = _generate(args, rank)
    except (RanktableError, npu_tools.ToolError, rendezvous.RendezvousError) as e:
        return _fail(str(e))
    try:
        tmp = f"{args.output}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(table, f, indent=4)
        os.replace(tmp, args.output)
    except OSError as e:
        return _fail(f"cannot write {args.output}: {e.strerror}")
    ip, nic = args.ips[rank], args.network_card_name or "<NIC of " + args.ips[rank] + ">"
    print(f"wrote {args.output}: {len(table['prefill_device_list'])} prefill and "
          f"{len(table['decode_device_list'])} decode device(s) over {table['server_count']} node(s)")
    print(f"on this node: export HCCL_IF_IP={ip} HCCL_SOCKET_IFNAME={nic} GLOO_SOCKET_IFNAME={nic} "
          f"DISAGGREGATED_PREFILL_RANK_TABLE_PATH={os.path.abspath(args.output)}")
    return 0


def _validate(args) -> int:
    """Check the flags (before touching any tool); returns this node's rank."""
    missing = [f for f, v in (("--ips", args.ips), ("--prefill-device-cnt", args.prefill_device_cnt),
                              ("--decode-device-cnt", args.decode_device_cnt)) if v is None]
    if missing:
        raise RanktableError(f"the following arguments are required: {', '.join(missing)} (or --check FILE)")
    for ip in args.ips:
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            raise RanktableError(f"--ips: {ip!r} is not an IPv4 address") from None
    dups = sorted({ip for ip in args.ips if args.ips.count(ip) > 1})
    if dups:
        raise RanktableError(f"--ips lists {', '.join(dups)} more than once (one IP per node)")
    total = args.prefill_device_cnt + args.decode_device_cnt
    if total == 0:
        raise RanktableError("--prefill-device-cnt + --decode-device-cnt must be at least 1")
    if args.npus_per_node and total > len(args.ips) * args.npus_per_node:
        raise RanktableError(f"--prefill-device-cnt {args.prefill_device_cnt} + --decode-device-cnt "
                             f"{args.decode_device_cnt} exceeds {len(args.ips)} node(s) x --npus-per-node "
                             f"{args.npus_per_node}")
    if args.network_card_name:
        try:
            socket.if_nametoindex(args.network_card_name)
        except OSError:
            raise RanktableError(f"--network-card-name {args.network_card_name!r}: no such network card on "
                                 "this node") from None
    if args.node_rank is not None:
        if args.node_rank >= len(args.ips):
            raise RanktableError(f"--node-rank {args.node_rank} must be below the {len(args.ips)} --ips")
        return args.node_rank
    local = [i for i, ip in enumerate(args.ips) if _is_local(ip)]
    if not local:
        raise RanktableError("none of --ips is an address of this node; give --node-rank")
    if len(local) > 1:
        raise RanktableError(f"several of --ips are addresses of this node ({', '.join(args.ips[i] for i in local)});"
                             " give --node-rank")
    return local[0]


def _is_local(ip: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((ip, 0))
            return True
        except OSError:
            return False


def _generate(args, rank: int) -> dict:
    devices = npu_tools.local_devices()
    if args.npus_per_node:
        if len(devices) < args.npus_per_node:
            raise RanktableError(f"this node ({args.ips[rank]}) has {len(devices)} device(s), fewer than "
                                 f"--npus-per-node {args.npus_per_node}")
        devices = devices[:args.npus_per_node]
    same = {"ips": args.ips, "prefill": args.prefill_device_cnt, "decode": args.decode_device_cnt}
    msg = {"node_rank": rank, "devices": devices, **same}
    if rank:
        result = rendezvous.join(args.ips[0], args.master_port, msg, args.timeout)
    else:
        nodes = {0: devices}

        def accept(m: dict):
            r = m.get("node_rank")
            if {k: m.get(k) for k in same} != same:
                return (f"node {args.ips[r] if isinstance(r, int) and 0 <= r < len(args.ips) else r} was started "
                        f"with other --ips / counts than the first node ({' '.join(args.ips)}, prefill "
                        f"{args.prefill_device_cnt}, decode {args.decode_device_cnt})")
            if not isinstance(r, int) or not 0 < r < len(args.ips):
                return f"node rank {r!r} is not one of 1..{len(args.ips) - 1}"
            if r in nodes:
                return f"node rank {r} ({args.ips[r]}) joined twice"
            if not isinstance(m.get("devices"), list) or not all(isinstance(d, dict) for d in m["devices"]):
                return f"node {args.ips[r]} sent no device list"
            nodes[r] = m["devices"]
            return None

        def answer(_msgs, complete: bool) -> dict:
            if not complete:
                gone = [f"{i} ({args.ips[i]})" for i in range(len(args.ips)) if i not in nodes]
                return {"error": f"node(s) {', '.join(gone)} did not join within {args.timeout:g} s"}
            try:
                return {"table": build([(args.ips[i], nodes[i]) for i in range(len(args.ips))],
                                       args.prefill_device_cnt, args.decode_device_cnt)}
            except RanktableError as e:
                return {"error": str(e)}

        result = rendezvous.serve(args.ips[0], args.master_port, len(args.ips) - 1, args.timeout, accept, answer) \
            if len(args.ips) > 1 else answer([], True)
    if "error" in result:
        raise RanktableError(str(result["error"]))
    return result["table"]
