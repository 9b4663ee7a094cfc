"""Row masks and token weights: who gets distilled, and how token terms are averaged.

- KD_MASKS (METHODS.md §5, KDRL's reward-guided masks): ``fn(rewards[B], group_size,
  correct_threshold) -> m[B]`` in {0, 1}.
- LOSS_AGGREGATIONS (METHODS.md §4, ``loss_agg``): ``fn(response_mask[B, R],
  max_response_len, all_reduce_sum) -> token_weights[B, R]`` over the FULL batch, so that
  loss = Σ_t term_t · token_weights_t. Slicing rows keeps this normalisation, so the
  micro-batch losses of one batch add up to the batch loss exactly.

``all_reduce_sum`` is applied to every normaliser (token count, row count) so that
data-parallel ranks share one normalisation; it is the identity on one process.
"""
from __future__ import annotations

from typing import Callable

import torch

from kdrl.objective.divergences import upcast

Tensor = torch.Tensor
AllReduceSum = Callable[[Tensor], Tensor]
KdMaskFn = Callable[[Tensor, int, float], Tensor]
AggregationFn = Callable[[Tensor, int, AllReduceSum], Tensor]


def identity(x: Tensor) -> Tensor:
    return x


# --------------------------------------------------------------------------- KD masks m_i

def kd_mask_none(rewards: Tensor, group_size: int, correct_threshold: float) -> Tensor:
    """m_i = 1: distil on every response."""
    return torch.ones_like(rewards, dtype=torch.float32)


def kd_mask_incorrect(rewards: Tensor, group_size: int, correct_threshold: float) -> Tensor:
    """m_i = 1 only where response i failed: no imitation where the student already succeeded.

    Assumption: METHODS.md says "r_i below the maximum"; we read the maximum as the maximum
    attainable reward, i.e. m_i = 1 where r_i < correct_threshold. (The group's maximum
    would switch KD off for groups where everything failed, the opposite of the intent.)
    """
    return (rewards < correct_threshold).float()


def kd_mask_group_all_wrong(rewards: Tensor, group_size: int, correct_threshold: float) -> Tensor:
    """m_i = 1 only for groups in which no response reached correct_threshold."""
    grouped = rewards.reshape(-1, group_size)
    all_wrong = (grouped < correct_threshold).all(dim=1, keepdim=True)
    return all_wrong.expand_as(grouped).reshape(-1).float()


KD_MASKS: dict[str, KdMaskFn] = {
    "none": kd_mask_none,
    "incorrect": kd_mask_incorrect,
    "group_all_wrong": kd_mask_group_all_wrong,
}


# --------------------------------------------------------------------------- loss aggregation

def token_mean(response_mask: Tensor, max_response_len: int, all_reduce_sum: AllReduceSum = identity) -> Tensor:
    """w_t = mask_t / Σ_batch mask: every response token of the batch counts once (DAPO)."""
    mask = upcast(response_mask)
    total = all_reduce_sum(mask.sum()).clamp_min(1.0)
    return mask / total


def seq_mean_token_mean(response_mask: Tensor, max_response_len: int,
                        all_reduce_sum: AllReduceSum = identity) -> Tensor:
    """w_t = mask_t / (len_i · B): mean within a response, then over responses (original GRPO)."""
    mask = upcast(response_mask)
    lengths = mask.sum(dim=1, keepdim=True).clamp_min(1.0)
    rows = all_reduce_sum(torch.tensor(float(mask.shape[0]), device=mask.device)).clamp_min(1.0)
    return mask / (lengths * rows)


def seq_mean_token_sum_norm(response_mask: Tensor, max_response_len: int,
                            all_reduce_sum: AllReduceSum = identity) -> Tensor:
    """w_t = mask_t / (max_response_len · B): a constant normaliser, no length bias (Dr. GRPO,
    arXiv 2503.20783); ``max_response_len`` is the generation budget, not the batch's longest."""
    mask = upcast(response_mask)
    rows = all_reduce_sum(torch.tensor(float(mask.shape[0]), device=mask.device)).clamp_min(1.0)
    return mask / (float(max_response_len) * rows)


LOSS_AGGREGATIONS: dict[str, AggregationFn] = {
    "token_mean": token_mean,
    "seq_mean_token_mean": seq_mean_token_mean,
    "seq_mean_token_sum_norm": seq_mean_token_sum_norm,
}
