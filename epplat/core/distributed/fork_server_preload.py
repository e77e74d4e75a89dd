"""What the elastic EP fork server (fork_server.py) imports once as it starts: what an engine process
imports, so that every process forked from it has it already; and it dies with the API server that
started it (its children die with it: run_forked_engine). Imported only there, and so inherited by its
children. Nothing here starts a thread pool, a process group or a device."""

import os
import sys

from epplat.core.distributed.lifeline import die_with_parent

SERVER_PID = os.getpid()            # the fork server's own pid: its children's parent
die_with_parent(os.getppid())

from epplat.core.engine import core, elastic, model_runner  # noqa: E402,F401
from epplat.core.engine.core_proc import run_engine_process  # noqa: E402,F401
from epplat.plugins import registry  # noqa: E402
from transformers import AutoConfig  # noqa: E402,F401

registry()                          # every plugin module, platforms included
sys.stdout.flush()                  # nothing buffered here is written again by each child
sys.stderr.flush()
