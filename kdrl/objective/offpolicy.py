"""Terms for rows the student did not sample (METHODS.md §6 ampo; LUFFY's policy shaping).

AMPO trains on stored teacher solutions inside a group of the student's own rollouts. Their
tokens get the policy gradient of

    L_t = −A_i · f(π_θ(o_t)),   f(p) = p / (p + γ)

with no importance ratio (there is no sampler probability for a teacher's text) and no clip.
∇f(p) = γ / (p + γ)² · ∇p, so low-probability tokens of the solution get a larger push than
the plain ∇p would give them, and the gradient stays bounded where p → 0 (unlike ∇log p).
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def shaping(p: Tensor, gamma: float) -> Tensor:
    """f(p) = p / (p + γ), γ = 0.1 in AMPO and LUFFY."""
    return p / (p + gamma)


def shaped_offpolicy_pg(logprobs: Tensor, advantages: Tensor, gamma: float) -> Tensor:
    """−A·f(exp(s_t)) per token: the off-policy policy-gradient term, no ratio, no clip."""
    return -advantages * shaping(torch.exp(logprobs), gamma)
