"""Many `epplat` command lines that must fail, each in a process of its own, for the price of one
start: one Python process imports torch, transformers and epplat's command line once, then forks
a child per command line, which runs `epplat.cli.main` with its own stderr and exit status, as
`python -m epplat.cli ...` would. Each test of bad flags used to pay a full interpreter start per
line (2-3 s on the CI machine); a fork costs milliseconds.

`env` of `run` is the forking process's environment, so every command line of one call shares it.
A child that runs past its timeout is killed and reported with exit status None.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import NamedTuple, Optional

_RUNNER = r"""
import json, os, select, sys, time, traceback
import torch, transformers            # what `epplat serve` imports anyway: paid once
import epplat.cli, epplat.serve
epplat.cli.build_parser()             # the plugins' entry points and hooks, once
cases = json.loads(sys.stdin.read())
results = []
for argv, timeout in cases:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                      # the child: one `epplat ...` command line
        os.close(r)
        os.dup2(w, 1)
        os.dup2(w, 2)
        try:
            code = epplat.cli.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    os.close(w)
    out, deadline, status = b"", time.monotonic() + timeout, None
    while True:
        ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:                 # past its timeout: a command line that should have failed did not
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            break
        chunk = os.read(r, 65536)
        if not chunk:
            status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            break
        out += chunk
    os.close(r)
    results.append([status, out.decode(errors="replace")])
sys.__stdout__.write(json.dumps(results))
"""


class Result(NamedTuple):
    returncode: Optional[int]     # None: killed after its timeout
    output: str                   # its stdout and stderr, interleaved as written

    def error_lines(self) -> list[str]:
        return [ln for ln in self.output.splitlines() if "error" in ln.lower()]


def run(cases: list[list[str]], env: Optional[dict] = None, timeout: float = 60) -> list[Result]:
    """Each argv of `cases` (without the program name) as its own `epplat` process; `env` is added to
    the environment of them all (it is the forking process's, so it holds at import time too)."""
    payload = json.dumps([[list(map(str, argv)), timeout] for argv in cases])
    p = subprocess.run([sys.executable, "-c", _RUNNER], input=payload, capture_output=True, text=True,
                       timeout=120 + timeout * len(cases), env={**os.environ, **(env or {})})
    assert p.returncode == 0, p.stderr[-3000:]
    return [Result(code, out) for code, out in json.loads(p.stdout)]


def assert_one_error_line(result: Result, needle: str, what=None) -> None:
    """The command line failed with one error line naming `needle`, and no traceback."""
    errors = result.error_lines()
    assert result.returncode not in (0, None), (what, result)
    assert len(errors) == 1 and needle in errors[0], (what, result.output)
    assert "Traceback" not in result.output, (what, result.output)
