"""Child processes die with their parent, however the parent dies.

On Linux the kernel sends SIGKILL to a child whose parent exits (PR_SET_PDEATHSIG), even
when the parent was SIGKILLed or OOM-killed and could run no cleanup; an engine blocked
in a zmq send or a collective cannot outlive its launcher. Elsewhere the engines' own
liveness checks (parent pid, store) are what remains.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(expected_parent: int) -> None:
    """Ask for SIGKILL when the parent exits; exit now if `expected_parent` is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != expected_parent:    # the parent died before the request took effect
        os._exit(1)
