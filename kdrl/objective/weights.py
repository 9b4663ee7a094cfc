"""Row masks and token weights: who gets distilled, and how token terms are averaged.

- KD_MASKS (METHODS.md §5, KDRL's reward-guided masks): ``fn(rewards[B], group_size,
  correct_threshold) -> m[B]`` in {0, 1}.
- LOSS_AGGREGATIONS (METHODS.md §4, ``loss_agg``): ``fn(response_mask[B, R],
  max_response_len, all_reduce_sum) -> token_weights[B, R]`` over the FULL batch, so that
  loss = Σ_t term_t · token_weights_t. Slicing rows keeps this normalisation, so the
  micro-batch losses of one batch add up to the batch loss exactly.

- ROW_WEIGHTS (``row_weights``): ``fn(batch, correct_threshold, cfg) -> (kd_weight[B],
  nll_weight[B])``, multiplying the KD mask and the likelihood mask (SCOPE); they read the
  batch's rewards, groups, sampler and teacher log-probs and response mask.
- TOKEN_SELECTIONS (``kd_token_selection``): ``fn(batch, divergence[B, R], cfg) ->
  kd_token_weights[B, R]``: which tokens carry the KD term (TIP, from the batch's response mask
  and sampler entropy).

``all_reduce_sum`` is applied to every normaliser (token count, row count) so that
data-parallel ranks share one normalisation; it is the identity on one process.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from kdrl.config import ObjectiveConfig
from kdrl.objective.divergences import upcast
from kdrl.types import TrainBatch

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


# --------------------------------------------------------------------------- row weights (KD / likelihood)

RowWeightFn = Callable[[TrainBatch, float, ObjectiveConfig], tuple[Tensor, Tensor]]


def row_weights_none(batch: TrainBatch, correct_threshold: float, cfg: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """Every row weighs 1 in both the KD and the likelihood term."""
    ones = torch.ones_like(upcast(batch.rewards))
    return ones, ones


def mean_response_logprob(logprobs: Tensor, response_mask: Tensor) -> Tensor:
    """[B]: the mean per-token log-prob over each response's tokens (0 for an empty response)."""
    mask = upcast(response_mask)
    return (upcast(logprobs) * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)


def group_softmax_weights(scores: Tensor, members: Tensor, group_size: int) -> Tensor:
    """w_i = n·softmax_{j in set}(scores_j) for rows in the set, 0 elsewhere, within each group;
    n = the set's size in that group, so the set's weights average 1. An empty set: all 0."""
    grouped = scores.reshape(-1, group_size)
    inside = members.reshape(-1, group_size)
    logits = grouped.masked_fill(~inside, -math.inf)
    empty = ~inside.any(dim=1, keepdim=True)
    weights = torch.softmax(logits.masked_fill(empty, 0.0), dim=1)  # empty groups: uniform, zeroed below
    count = inside.sum(dim=1, keepdim=True).to(weights.dtype)
    return torch.where(inside, count * weights, torch.zeros_like(weights)).reshape(-1)


def row_weights_scope(batch: TrainBatch, correct_threshold: float, cfg: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """SCOPE's dual-path routing by correctness within each group (METHODS.md §6).

    Incorrect rows get the KD term, weighted w_tea = n·softmax over the group's incorrect rows of
    (mean teacher log-prob / T): responses the teacher finds more plausible count more.
    Correct rows get the likelihood term, weighted w_stu = n·softmax over the group's correct rows
    of (−mean student log-prob / T): the student's least confident correct responses count more.
    This follows the paper's text; its released code uses the opposite sign in w_stu. The student
    log-probs are the sampler's (π_old, no gradient). A group with no incorrect (no correct) rows
    gives KD (likelihood) weight 0 to every row. T is ``objective.scope_temperature``.
    """
    if batch.teacher_logprobs is None:
        raise ValueError("objective.row_weights=scope needs the teacher's log-probs (model.teacher)")
    correct = upcast(batch.rewards) >= correct_threshold
    teacher_mean = mean_response_logprob(batch.teacher_logprobs, batch.response_mask)
    student_mean = mean_response_logprob(batch.sampler_logprobs, batch.response_mask)
    temperature, size = cfg.scope_temperature, batch.group_size
    w_tea = group_softmax_weights(teacher_mean / temperature, ~correct, size)
    w_stu = group_softmax_weights(-student_mean / temperature, correct, size)
    return w_tea, w_stu


ROW_WEIGHTS: dict[str, RowWeightFn] = {"none": row_weights_none, "scope": row_weights_scope}


# --------------------------------------------------------------------------- token selection for the KD term

TokenSelectionFn = Callable[[TrainBatch, Tensor, ObjectiveConfig], Tensor]
TIP_ENTROPY_PERCENTILE = 0.98  # ĥ is clipped at this quantile of the batch's entropies (METHODS.md §6)


def select_all_tokens(batch: TrainBatch, divergence: Tensor, cfg: ObjectiveConfig) -> Tensor:
    """Every response token carries the KD term."""
    return upcast(batch.response_mask)


def select_tip_tokens(batch: TrainBatch, divergence: Tensor, cfg: ObjectiveConfig) -> Tensor:
    """TIP (METHODS.md §6): keep the top ``tip_keep_fraction`` of the batch's response tokens by
    (1 − ĥ_t)·δ_t, "overconfident and wrong" tokens: ĥ_t = min(H_t, H_98) / H_98 with H the
    sampler's entropy and H_98 its 98th percentile over the batch's tokens; δ_t ≥ 0 the per-token
    divergence given by the caller. The count kept is ceil(fraction · tokens); ties are broken
    by position (torch.topk). Kept tokens are scaled by tokens / kept, so that under
    ``token_mean`` the KD term is the mean over the kept tokens (assumption: TIP trains on the
    kept tokens only; the scale keeps β comparable to unselected KD).
    """
    if batch.sampler_entropy is None:
        raise ValueError("objective.kd_token_selection=tip needs the sampler's entropy (rollouts.sampler_entropy)")
    keep_fraction = cfg.tip_keep_fraction
    mask = upcast(batch.response_mask)
    valid = mask > 0
    total = int(valid.sum())
    if total == 0:
        return mask
    entropy = upcast(batch.sampler_entropy)[valid]
    ceiling = torch.quantile(entropy, TIP_ENTROPY_PERCENTILE)
    normalised = (entropy.clamp(max=ceiling) / ceiling) if ceiling > 0 else torch.zeros_like(entropy)
    score = (1.0 - normalised) * upcast(divergence)[valid]
    kept = min(total, max(1, math.ceil(round(keep_fraction * total, 9))))  # 0.2·15 is 3, not 4
    chosen = torch.zeros_like(score)
    chosen[score.topk(kept).indices] = total / kept
    out = torch.zeros_like(mask)
    out[valid] = chosen
    return out


TOKEN_SELECTIONS: dict[str, TokenSelectionFn] = {"all": select_all_tokens, "tip": select_tip_tokens}
