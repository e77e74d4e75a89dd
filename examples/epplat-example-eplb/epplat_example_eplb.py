"""An example third-party epplat plugin: an EPLB policy that weighs migration cost."""

from __future__ import annotations

import logging
import os

import torch

from epplat.core.moe.eplb import rebalance_experts
from epplat.hookspecs import Registration, hookimpl

logger = logging.getLogger(__name__)


def peak_gpu_load(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """[L]: the load of the busiest GPU per layer, each expert's load split evenly over its replicas."""
    count = torch.zeros_like(weight).scatter_add_(1, phy2log, torch.ones_like(phy2log, dtype=weight.dtype))
    per_slot = weight.gather(1, phy2log) / count.gather(1, phy2log)
    return per_slot.view(weight.shape[0], num_gpus, -1).sum(-1).max(-1).values


def sticky(weight, num_replicas, num_groups, num_nodes, num_gpus, old_phy2log=None):
    """The default placement, for each layer where it lowers the peak GPU load enough; else the current one."""
    phy2log, log2phy, logcnt = rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
    if old_phy2log is None:
        return phy2log, log2phy, logcnt
    weight = weight.double()
    min_gain = float(os.environ.get("EPPLAT_STICKY_MIN_GAIN", "0.05"))
    old_peak = peak_gpu_load(weight, old_phy2log, num_gpus)
    new_peak = peak_gpu_load(weight, phy2log, num_gpus)
    keep = new_peak > old_peak * (1 - min_gain)
    logger.info("sticky EPLB policy: %d of %d layers keep their placement", int(keep.sum()), len(keep))
    out = torch.where(keep[:, None], old_phy2log, phy2log)
    return out, None, None      # epplat derives log2phy and logcnt from phy2log


@hookimpl
def epplat_eplb_policies():
    return [Registration("sticky", lambda: sticky,
                         help="default placement only where it cuts the peak GPU load by 5%+ (example plugin)")]
