"""`epplat ranktable`: the HCCL ranktable from fake `npu-smi` / `hccn_tool` executables on PATH that print
the real tools' output (910B and A3 forms), one node and two nodes as two processes on loopback, and bad
inputs (one error line each). `--check FILE` on good and broken ranktables."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from server_utils import free_port
from simulations.ascend_tools import env_with, install


def ranktable(*args, env, cwd=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "epplat.cli", "ranktable", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def one_error_line(r, needle: str) -> None:
    assert r.returncode != 0, r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and needle in lines[0], r.stderr


def test_one_node_910b(tmp_path):
    env = env_with(install(tmp_path / "bin", kind="910b", npus=8, ip_prefix="29.7.91.", ip_start=60))
    out = tmp_path / "rt.json"
    r = ranktable("--ips", "127.0.0.1", "--npus-per-node", "8", "--prefill-device-cnt", "4",
                  "--decode-device-cnt", "4", "--master-port", str(free_port()), "--output", str(out), env=env)
    assert r.returncode == 0, r.stderr
    table = json.loads(out.read_text())
    assert table["version"] == "1.2" and table["status"] == "completed" and table["server_count"] == "1"
    assert table["prefill_device_list"] == [
        {"server_id": "127.0.0.1", "device_id": str(i), "device_ip": f"29.7.91.{60 + i}", "cluster_id": str(i + 1)}
        for i in range(4)]
    assert [d["device_id"] for d in table["decode_device_list"]] == ["4", "5", "6", "7"]
    assert [d["cluster_id"] for d in table["decode_device_list"]] == ["5", "6", "7", "8"]
    assert "export HCCL_IF_IP=127.0.0.1" in r.stdout
    ok = ranktable("--check", str(out), env=env)
    assert ok.returncode == 0 and "ok: 1 server(s), 4 prefill and 4 decode device(s)" in ok.stdout, ok.stderr


def test_one_node_a3_super_pod_with_hccn_tool_path(tmp_path):
    tools = install(tmp_path / "bin", kind="a3", npus=8, ip_prefix="192.168.2.", ip_start=100, super_pod_id=3,
                    server_index=5)
    # hccn_tool found through HCCN_TOOL_PATH only; npu-smi through PATH
    (tmp_path / "driver").mkdir()
    (tools / "hccn_tool").rename(tmp_path / "driver" / "hccn_tool")
    env = env_with(tools, HCCN_TOOL_PATH=str(tmp_path / "driver" / "hccn_tool"))
    out = tmp_path / "rt.json"
    r = ranktable("--ips", "127.0.0.1", "--prefill-device-cnt", "6", "--decode-device-cnt", "10",
                  "--master-port", str(free_port()), "--output", str(out), env=env)
    assert r.returncode == 0, r.stderr
    table = json.loads(out.read_text())
    devs = table["prefill_device_list"] + table["decode_device_list"]
    assert len(table["prefill_device_list"]) == 6 and len(devs) == 16
    # device id = npu * 2 + chip; SDID from spod-info of (npu, chip)
    for i, d in enumerate(devs):
        assert d == {"server_id": "127.0.0.1", "device_id": str(i), "device_ip": f"192.168.2.{100 + i}",
                     "cluster_id": str(i + 1), "super_pod_id": "3", "super_device_id": str(0x6000000 + 5 * 64 + i)}
    ok = ranktable("--check", str(out), env=env)
    assert ok.returncode == 0 and "A3 super pod" in ok.stdout


def test_two_nodes_as_two_processes_on_loopback(tmp_path):
    port = str(free_port())
    procs, outs = [], []
    # node 1 starts first: it retries until the first node listens
    for rank in (1, 0):
        env = env_with(install(tmp_path / f"bin{rank}", npus=8, ip_prefix=f"29.7.{rank}.", ip_start=10))
        out = tmp_path / f"node{rank}" / "ranktable.json"
        out.parent.mkdir()
        outs.append(out)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "epplat.cli", "ranktable", "--ips", "127.0.0.1", "127.0.0.2",
             "--npus-per-node", "8", "--prefill-device-cnt", "8", "--decode-device-cnt", "8", "--node-rank", str(rank),
             "--master-port", port, "--timeout", "60"], cwd=out.parent, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    t1, t0 = (json.loads(o.read_text()) for o in outs)
    assert t0 == t1, "every node writes the same ranktable"
    assert t0["server_count"] == "2"
    assert {d["server_id"] for d in t0["prefill_device_list"]} == {"127.0.0.1"}
    assert [d["device_ip"] for d in t0["decode_device_list"]] == [f"29.7.1.{10 + i}" for i in range(8)]
    assert [d["cluster_id"] for d in t0["decode_device_list"]] == [str(9 + i) for i in range(8)]


def test_node_that_never_joins_and_mismatched_nodes(tmp_path):
    env = env_with(install(tmp_path / "bin", npus=2))
    port = str(free_port())
    r = ranktable("--ips", "127.0.0.1", "127.0.0.2", "--node-rank", "0", "--prefill-device-cnt", "2",
                  "--decode-device-cnt", "2", "--master-port", port, "--timeout", "1.5", env=env)
    one_error_line(r, "node(s) 1 (127.0.0.2) did not join within 1.5 s")
    # a node started with other counts than the first node is turned away with one line, on both nodes
    first = subprocess.Popen([sys.executable, "-m", "epplat.cli", "ranktable", "--ips", "127.0.0.1", "127.0.0.2",
                              "--node-rank", "0", "--prefill-device-cnt", "2", "--decode-device-cnt", "2",
                              "--master-port", port, "--timeout", "8", "--output", str(tmp_path / "x.json")],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    r = ranktable("--ips", "127.0.0.1", "127.0.0.2", "--node-rank", "1", "--prefill-device-cnt", "1",
                  "--decode-device-cnt", "2", "--master-port", port, "--timeout", "8", env=env)
    one_error_line(r, "was started with other --ips / counts than the first node")
    _, err = first.communicate(timeout=30)
    assert first.returncode == 1 and "did not join" in err and not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("args, needle", [
    (["--ips", "127.0.0.1", "--prefill-device-cnt", "6", "--decode-device-cnt", "6"], "exceeds the 8 devices of the 1"),
    (["--ips", "127.0.0.1", "127.0.0.2", "--npus-per-node", "8", "--prefill-device-cnt", "9",
      "--decode-device-cnt", "8"], "exceeds 2 node(s) x --npus-per-node 8"),
    (["--ips", "127.0.0.1", "--npus-per-node", "16", "--prefill-device-cnt", "1", "--decode-device-cnt", "1"],
     "has 8 device(s), fewer than --npus-per-node 16"),
    (["--ips", "10.0.0.1", "10.0.0.2", "10.0.0.1", "--prefill-device-cnt", "1", "--decode-device-cnt", "1"],
     "--ips lists 10.0.0.1 more than once"),
    (["--ips", "127.0.0.1", "127.0.0.2", "--prefill-device-cnt", "1", "--decode-device-cnt", "1"],
     "several of --ips are addresses of this node"),
    (["--ips", "203.0.113.7", "--prefill-device-cnt", "1", "--decode-device-cnt", "1"],
     "none of --ips is an address of this node"),
    (["--ips", "node-a", "--prefill-device-cnt", "1", "--decode-device-cnt", "1"], "'node-a' is not an IPv4"),
    (["--ips", "127.0.0.1", "--node-rank", "1", "--prefill-device-cnt", "1", "--decode-device-cnt", "1"],
     "--node-rank 1 must be below the 1 --ips"),
    (["--ips", "127.0.0.1", "--prefill-device-cnt", "1"], "required: --decode-device-cnt"),
    (["--ips", "127.0.0.1", "--prefill-device-cnt", "-1", "--decode-device-cnt", "1"], "--prefill-device-cnt"),
    (["--ips", "127.0.0.1", "--prefill-device-cnt", "0", "--decode-device-cnt", "0"], "must be at least 1"),
    (["--ips", "127.0.0.1", "--network-card-name", "nosuchnic0", "--prefill-device-cnt", "1",
      "--decode-device-cnt", "1"], "'nosuchnic0': no such network card"),
    (["--check", "rt.json", "--ips", "127.0.0.1"], "give it without --ips"),
])
def test_bad_inputs_are_one_line(tmp_path, args, needle):
    env = env_with(install(tmp_path / "bin", npus=8))
    r = ranktable(*args, "--master-port", str(free_port()), env=env, cwd=tmp_path)
    one_error_line(r, needle)
    assert not (tmp_path / "ranktable.json").exists()


def test_missing_or_broken_tools_are_one_line(tmp_path):
    base = "--ips", "127.0.0.1", "--prefill-device-cnt", "1", "--decode-device-cnt", "1"
    empty = tmp_path / "empty"
    empty.mkdir()
    r = ranktable(*base, env={**env_with(empty), "PATH": str(empty)}, cwd=tmp_path)
    one_error_line(r, "npu-smi not found")
    env = env_with(install(tmp_path / "bin", npus=4, no_ip=(2,)))
    r = ranktable(*base, env=env, cwd=tmp_path)
    one_error_line(r, "`hccn_tool -i 2 -ip -g` printed '', not an IPv4 address")
    env = env_with(install(tmp_path / "bin2", npus=4), HCCN_TOOL_PATH=str(tmp_path / "nowhere" / "hccn_tool"))
    r = ranktable(*base, env=env, cwd=tmp_path)
    one_error_line(r, "hccn_tool not found")


def _good_table():
    devs = [{"server_id": "10.0.0.1", "device_id": str(i), "device_ip": f"29.0.0.{i + 1}", "cluster_id": str(i + 1)}
            for i in range(4)]
    return {"version": "1.2", "server_count": "1", "prefill_device_list": devs[:2], "decode_device_list": devs[2:],
            "status": "completed"}


def _broken(kind):
    t = _good_table()
    if kind == "version":
        t["version"] = "1.0"
    elif kind == "dup_ip":
        t["decode_device_list"][0]["device_ip"] = "29.0.0.1"
    elif kind == "gap":
        t["decode_device_list"][1]["cluster_id"] = "7"
    elif kind == "missing_key":
        del t["prefill_device_list"][1]["device_ip"]
    elif kind == "server_count":
        t["decode_device_list"][1]["server_id"] = "10.0.0.2"
    elif kind == "half_a3":
        t["decode_device_list"][1].update(super_pod_id="0", super_device_id="1")
    elif kind == "int_values":
        t["server_count"] = 1
    return t


@pytest.mark.parametrize("kind, needle", [
    ("version", "version is '1.0', expected '1.2'"),
    ("dup_ip", "device_ip 29.0.0.1 is listed twice"),
    ("gap", "cluster_id must run 1, 2, 3"),
    ("missing_key", "prefill_device_list[1] has keys"),
    ("server_count", "server_count is 1 but the devices are on 2 servers"),
    ("half_a3", "every device of an A3 ranktable has super_pod_id"),
    ("int_values", "server_count must be a string of digits"),
    ("not_json", "is not valid JSON"),
])
def test_check_rejects_broken_ranktables(tmp_path, kind, needle):
    path = tmp_path / "rt.json"
    path.write_text("{oops" if kind == "not_json" else json.dumps(_broken(kind)))
    r = ranktable("--check", str(path), env=env_with(tmp_path))
    one_error_line(r, needle)
    path.write_text(json.dumps(_good_table()))
    assert ranktable("--check", str(path), env=env_with(tmp_path)).returncode == 0
