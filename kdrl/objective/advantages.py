"""Outcome advantages A_i, one per response (METHODS.md §1).

Every estimator is ``fn(rewards[B], group_size) -> [B]``; the G rows of one prompt's
group are consecutive. A group whose rewards are all equal gets A_i = 0 exactly (not
merely up to rounding of the group mean), for every estimator.
"""
from __future__ import annotations

from typing import Callable

import torch

from kdrl.objective.divergences import upcast

Tensor = torch.Tensor
AdvantageFn = Callable[[Tensor, int], Tensor]

GRPO_EPS = 1e-6  # METHODS.md §1: (r - mean) / (std + 1e-6)


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    """[B] -> [B / G, G]; a batch that is not whole groups is a caller error."""
    if group_size < 1 or rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not form groups of {group_size}")
    return upcast(rewards).reshape(-1, group_size)


def _zero_uniform_groups(advantages: Tensor, grouped: Tensor) -> Tensor:
    """A_i = 0 for groups whose rewards are all equal (r - mean(r) can be 1 ulp off zero)."""
    uniform = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return torch.where(uniform, torch.zeros_like(advantages), advantages).reshape(-1)


def grpo(rewards: Tensor, group_size: int) -> Tensor:
    """A_i = (r_i - mean_group r) / (std_group r + 1e-6)  (GRPO, DeepSeekMath).

    std is the unbiased sample std (Bessel's correction, divides by G - 1), as TRL's
    GRPOTrainer computes it with ``torch.std``; with G = 1 every advantage is 0.
    """
    r = _groups(rewards, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
    return _zero_uniform_groups(centred / (std + GRPO_EPS), r)


def drgrpo(rewards: Tensor, group_size: int) -> Tensor:
    """A_i = r_i - mean_group r, no std scaling (Dr. GRPO, arXiv 2503.20783)."""
    r = _groups(rewards, group_size)
    return _zero_uniform_groups(r - r.mean(dim=1, keepdim=True), r)


def rloo(rewards: Tensor, group_size: int) -> Tensor:
    """A_i = r_i - mean of the other G - 1 rewards (REINFORCE leave-one-out)."""
    r = _groups(rewards, group_size)
    if group_size == 1:
        return torch.zeros_like(r).reshape(-1)
    others_mean = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    return _zero_uniform_groups(r - others_mean, r)


def none(rewards: Tensor, group_size: int) -> Tensor:
    """A_i = 0: no outcome reward signal (pure distillation)."""
    return torch.zeros_like(_groups(rewards, group_size)).reshape(-1)


ADVANTAGES: dict[str, AdvantageFn] = {"grpo": grpo, "drgrpo": drgrpo, "rloo": rloo, "none": none}
