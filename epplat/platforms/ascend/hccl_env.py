"""The HCCL / gloo environment of an Ascend node (the variables vllm-ascend's run_dp_template sets).

HCCL and gloo read these themselves; epplat checks them before joining the process
group, so a typo is one clear line instead of a hang, and logs the ones that are set.
"""

from __future__ import annotations

import ipaddress
import os
import socket

from epplat.config import ConfigError

# name -> what it sets (README "Ascend" section lists the same)
HCCL_ENV = {
    "HCCL_IF_IP": "this node's IP for HCCL's host-side sockets",
    "HCCL_SOCKET_IFNAME": "NIC (or prefix list) HCCL's host-side sockets use",
    "GLOO_SOCKET_IFNAME": "NIC(s) the gloo control groups use",
    "TP_SOCKET_IFNAME": "NIC vLLM-style TP sockets use (read by vllm-ascend; set it the same)",
    "HCCL_BUFFSIZE": "MB of buffer per HCCL communicator (the template sets 1024 for EP)",
    "HCCL_CONNECT_TIMEOUT": "seconds HCCL waits for peers while connecting",
    "HCCL_EXEC_TIMEOUT": "seconds a collective may run",
    "HCCL_DETERMINISTIC": "true: reproducible reductions",
}


def _positive_int(name: str, value: str, unit: str) -> None:
    if not value.isdigit() or int(value) <= 0:
        raise ConfigError(f"{name}={value!r} is not a positive integer ({unit})")


def check(environ=None) -> list[str]:
    """Validate the set variables; returns 'NAME=value' for each one set (for the log)."""
    env = os.environ if environ is None else environ
    if env.get("HCCL_IF_IP"):
        ip = env["HCCL_IF_IP"]
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            raise ConfigError(f"HCCL_IF_IP={ip!r} is not an IPv4 address") from None
        with socket.socket() as s:
            try:
                s.bind((ip, 0))
            except OSError:
                raise ConfigError(f"HCCL_IF_IP={ip} is not an address of this node") from None
    for name, unit in (("HCCL_BUFFSIZE", "MB"), ("HCCL_CONNECT_TIMEOUT", "seconds"), ("HCCL_EXEC_TIMEOUT", "seconds")):
        if env.get(name):
            _positive_int(name, env[name], unit)
    if env.get("HCCL_DETERMINISTIC") and env["HCCL_DETERMINISTIC"].lower() not in ("true", "false"):
        raise ConfigError(f"HCCL_DETERMINISTIC={env['HCCL_DETERMINISTIC']!r} must be true or false")
    if env.get("GLOO_SOCKET_IFNAME"):
        for nic in env["GLOO_SOCKET_IFNAME"].split(","):
            try:
                socket.if_nametoindex(nic)
            except OSError:
                raise ConfigError(f"GLOO_SOCKET_IFNAME: no network card {nic!r} on this node") from None
    return [f"{k}={env[k]}" for k in HCCL_ENV if env.get(k)]
