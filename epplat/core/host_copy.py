"""Copies between host and device memory that do not wait for the device's queued work.

A blocking copy to or from an accelerator waits for everything queued on its stream; between
steps that would stall the host until the step in flight ends, which async scheduling is there to
avoid. Host-to-device copies go from pinned memory without blocking; a device-to-host copy starts
into pinned memory with an event after it, and its reader waits for that event alone (not for the
steps launched since). Where the device is host memory (cpu) nothing is copied.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

_HOST = torch.device("cpu")


_UNPINNABLE: set[str] = set()     # device types whose torch backend has no pinned host memory


def to_device(values, dtype, device) -> torch.Tensor:
    """A list (or nested lists) as a tensor on ``device``, copied without blocking (where the device's torch
    backend has no pinned memory, said once in a warning, the copy blocks)."""
    device = torch.device(device)
    t = torch.tensor(values, dtype=dtype)
    if device == _HOST:
        return t
    if device.type not in _UNPINNABLE:
        try:
            return t.pin_memory().to(device, non_blocking=True)
        except (NotImplementedError, RuntimeError) as e:
            _UNPINNABLE.add(device.type)
            logger.warning("no pinned host memory for %s devices (%s): host-to-device copies of step inputs "
                           "wait for the device", device.type, str(e).splitlines()[0][:120])
    return t.to(device)


class HostCopy:
    """A device tensor's copy into host memory, started when made; ``tolist`` waits for that copy only."""

    def __init__(self, t: torch.Tensor):
        self.event = None
        if t.device == _HOST:
            self.host = t
            return
        self.host = t.to(_HOST, non_blocking=True)
        self.event = torch.Event(device=t.device)
        self.event.record()

    def tolist(self) -> list:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()
