"""Stand-ins for hardware libraries CI cannot have, each named a simulation where a test uses it.

``npu/`` holds simulated ``torch_npu`` and ``torchair``, ``deepep/`` a simulated ``deep_ep``;
``datadist/`` a simulated ``llm_datadist`` (moving KV bytes between processes over loopback);
``ascend_tools`` writes fake ``npu-smi`` / ``hccn_tool`` executables. A simulated library is
importable only where a test asks for it: the ``simulation`` fixture (tests/conftest.py) puts
it on ``sys.path`` (spawned workers inherit that), and ``env(name)`` is the ``PYTHONPATH``
for a subprocess. See README.md for what each one provides.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# name -> the folder that goes on the path
LIBRARIES = {"npu": ROOT / "npu", "deepep": ROOT / "deepep", "datadist": ROOT / "datadist"}


def path(name: str) -> str:
    """The folder to put on the path for simulation ``name`` ("npu", "deepep" or "datadist")."""
    return str(LIBRARIES[name])


def env(*names: str, **extra: str) -> dict:
    """Environment entries for a subprocess that imports the simulations ``names``."""
    return {"PYTHONPATH": os.pathsep.join([*map(path, names), os.environ.get("PYTHONPATH", "")]), **extra}
