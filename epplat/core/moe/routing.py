"""DeepSeek-style expert selection: softmax or sigmoid scores, grouped top-k, bias correction.

The plain top-k softmax router lives in FusedMoE.route; a MoE layer given a
:class:`GroupedTopK` routes through it instead. Semantics follow DeepSeek's reference
inference code (and vLLM's ``grouped_topk``):

- scores = softmax(logits) or sigmoid(logits), in float32;
- selection uses scores + e_score_correction_bias when the layer has one (``noaux_tc``);
- with n_group > 1, a group's score is the sum of its two best biased scores (with a bias)
  or its best score (without); only the best topk_group groups compete for the top-k;
- weights are the unbiased scores of the chosen experts, renormalised when
  norm_topk_prob, then times routed_scaling_factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

SCORING = ("softmax", "sigmoid")


@dataclass
class GroupedTopK:
    top_k: int
    num_experts: int
    scoring: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    renormalize: bool = False
    scaling: float = 1.0
    use_bias: bool = False

    def __post_init__(self):
        if self.scoring not in SCORING:
            raise ValueError(f"scoring_func {self.scoring!r} is not one of {', '.join(SCORING)}")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ValueError(f"{self.num_experts} routed experts do not split into n_group={self.n_group} groups")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be between 1 and n_group={self.n_group}")
        per_group = self.num_experts // self.n_group
        if self.top_k > self.topk_group * per_group:
            raise ValueError(f"top-{self.top_k} does not fit in topk_group={self.topk_group} groups of {per_group}")
        if self.use_bias and self.n_group > 1 and per_group < 2:
            raise ValueError("noaux_tc groups need at least two experts each")

    def __call__(self, logits: torch.Tensor, bias: Optional[torch.Tensor]):
        """logits [T, E] -> (weights [T, K] float32, ids [T, K])."""
        logits = logits.float()
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        choice = scores + bias.float() if bias is not None else scores
        if self.n_group > 1:
            grouped = choice.view(-1, self.n_group, self.num_experts // self.n_group)
            group_scores = grouped.topk(2, dim=-1)[0].sum(-1) if bias is not None else grouped.amax(-1)
            keep = torch.topk(group_scores, self.topk_group, dim=-1, sorted=False)[1]
            mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            mask = mask.unsqueeze(-1).expand_as(grouped).reshape(-1, self.num_experts)
            choice = choice.masked_fill(~mask, float("-inf"))
        ids = torch.topk(choice, self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids
