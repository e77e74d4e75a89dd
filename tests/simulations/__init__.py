"""Stand-ins for hardware libraries CI cannot have, each named a simulation where a test uses it.

``npu/`` holds simulated ``torch_npu`` and ``torchair``, ``deepep/`` a simulated ``deep_ep``;
``ascend_tools`` writes fake ``npu-smi`` / ``hccn_tool`` executables. A simulated library is
importable only where a test asks for it: the ``simulation`` fixture (tests/conftest.py) puts
it on ``sys.path`` (spawned workers inherit that), and ``env(name)`` is the ``PYTHONPATH``
for a subprocess. See README.md for what each one provides.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LIBRARIES = {"npu": ROOT / "npu", "deepep": ROOT / "deepep"}   # name -> the folder that goes on the path


def path(name: str) -> str:
    """The folder to put on the path for simulation ``name`` ("npu" or "deepep")."""
    return str(LIBRARIES[name])


def env(name: str, **extra: str) -> dict:
    """Environment entries for a subprocess that imports simulation ``name``."""
    return {"PYTHONPATH": os.pathsep.join([path(name), os.environ.get("PYTHONPATH", "")]), **extra}
