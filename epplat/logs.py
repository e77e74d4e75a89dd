"""Logging setup shared by every epplat process: vLLM-like lines on stderr."""

from __future__ import annotations

import logging
import os


def setup_logging() -> None:
    level = os.environ.get("EPPLAT_LOGGING_LEVEL", "INFO").upper()
    fmt = "%(levelname)s %(asctime)s [%(processName)s %(filename)s:%(lineno)d] %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%m-%d %H:%M:%S", force=True)
