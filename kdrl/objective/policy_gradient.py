"""The policy-gradient term (METHODS.md §4, §6): PPO's clipped ratio, with two small registries for
its variants, each function taking the micro-batch's response tokens as one ``PGTokens``.

- PG_ANCHORS: the log-probability the ratio is taken against, ``fn(tokens, cfg) -> [N]``:
  ``sampler`` (s_old: GRPO / PPO / DAPO) or ``rlad`` (RLAD's α·s_old + (1 − α)·τ), chosen by
  ``objective.ratio_anchor_alpha`` (1 is ``sampler``).
- OFFPOLICY_PG (``objective.offpolicy_pg``): what rows the student did not sample get,
  ``fn(tokens, clipped_loss, cfg) -> [N]``: the clipped term like every row (``none``), or AMPO's
  shaped term −A·f(π_θ) (``shaped``).

AMPO (and LUFFY's policy shaping) trains on stored teacher solutions inside a group of the
student's own rollouts. Their tokens get the policy gradient of

    L_t = −A_i · f(π_θ(o_t)),   f(p) = p / (p + γ)

with no importance ratio (there is no sampler probability for a teacher's text) and no clip.
∇f(p) = γ / (p + γ)² · ∇p, so low-probability tokens of the solution get a larger push than
the plain ∇p would give them, and the gradient stays bounded where p → 0 (unlike ∇log p).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from kdrl.config import ObjectiveConfig

Tensor = torch.Tensor


@dataclass
class PGTokens:
    """The N response tokens of a micro-batch, flattened."""

    s: Tensor  # log π_θ of each sampled token, with gradient
    s_old: Tensor  # log π_old (the sampler's)
    advantages: Tensor  # Â per token
    teacher: Optional[Tensor] = None  # log π_T, when the teacher scored the batch
    not_sampled_by_student: Optional[Tensor] = None  # bool: teacher / dataset / cache rows (None: unknown)


def importance_ratio(s: Tensor, s_old: Tensor) -> Tensor:
    """ρ = exp(s − s_old); the log-ratio is clamped to ±20 before exp only as a guard against
    overflow (as verl does): far outside the clip range, where it never matters."""
    return torch.exp((s - s_old).clamp(-20.0, 20.0))


def policy_gradient_loss(ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """L_pg = −min(ρ·Â, clip(ρ, 1−ε_low, 1+ε_high)·Â)  (PPO clip, METHODS.md §4; DAPO's ε_high)."""
    return -torch.minimum(ratio * advantages, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages)


def clipped(ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float) -> Tensor:
    """Tokens whose clipped branch is the active minimum with zero gradient."""
    return ((advantages > 0) & (ratio > 1.0 + eps_high)) | ((advantages < 0) & (ratio < 1.0 - eps_low))


# --------------------------------------------------------------------------- the ratio's anchor

def anchored_log_denominator(sampler_logprobs: Tensor, teacher_logprobs: Optional[Tensor], alpha: float) -> Tensor:
    """log(π_old^α · π_T^(1−α)) = α·s_old + (1 − α)·τ: RLAD's trust-region anchor (METHODS.md §6).

    The geometric mixture is NOT renormalised over the vocabulary (a choice: the normaliser
    would need both full distributions, and it is a per-position constant that only shifts the
    clip window). α = 1 is s_old, GRPO's ratio, exactly (1·s_old + 0·τ is s_old bitwise).
    """
    if alpha == 1.0 and teacher_logprobs is None:
        return sampler_logprobs
    if teacher_logprobs is None:
        raise ValueError("objective.ratio_anchor_alpha < 1 needs the teacher's log-probs (model.teacher)")
    return alpha * sampler_logprobs + (1.0 - alpha) * teacher_logprobs


def sampler_anchor(tokens: PGTokens, cfg: ObjectiveConfig) -> Tensor:
    return tokens.s_old


def rlad_anchor(tokens: PGTokens, cfg: ObjectiveConfig) -> Tensor:
    return anchored_log_denominator(tokens.s_old, tokens.teacher, cfg.ratio_anchor_alpha)


PG_ANCHORS: dict[str, Callable[[PGTokens, ObjectiveConfig], Tensor]] = {"sampler": sampler_anchor,
                                                                         "rlad": rlad_anchor}


def anchor_of(cfg: ObjectiveConfig) -> str:
    return "sampler" if cfg.ratio_anchor_alpha == 1.0 else "rlad"


# --------------------------------------------------------------------------- rows the student did not sample

def shaping(p: Tensor, gamma: float) -> Tensor:
    """f(p) = p / (p + γ), γ = 0.1 in AMPO and LUFFY."""
    return p / (p + gamma)


def shaped_offpolicy_pg(logprobs: Tensor, advantages: Tensor, gamma: float) -> Tensor:
    """−A·f(exp(s_t)) per token: the off-policy policy-gradient term, no ratio, no clip."""
    return -advantages * shaping(torch.exp(logprobs), gamma)


def keep_clipped(tokens: PGTokens, clipped_loss: Tensor, cfg: ObjectiveConfig) -> Tensor:
    return clipped_loss


def ampo_shaped(tokens: PGTokens, clipped_loss: Tensor, cfg: ObjectiveConfig) -> Tensor:
    if tokens.not_sampled_by_student is None:
        return clipped_loss
    shaped = shaped_offpolicy_pg(tokens.s, tokens.advantages, cfg.offpolicy_shaping_gamma)
    return torch.where(tokens.not_sampled_by_student, shaped, clipped_loss)


OFFPOLICY_PG: dict[str, Callable[[PGTokens, Tensor, ObjectiveConfig], Tensor]] = {"none": keep_clipped,
                                                                                   "shaped": ampo_shaped}


def policy_gradient(tokens: PGTokens, cfg: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """(L_pg [N], the ratio it clipped [N]) for the configured anchor and off-policy treatment."""
    ratio = importance_ratio(tokens.s, PG_ANCHORS[anchor_of(cfg)](tokens, cfg))
    loss = policy_gradient_loss(ratio, tokens.advantages, cfg.clip_eps_low, cfg.clip_eps_high)
    return OFFPOLICY_PG[cfg.offpolicy_pg](tokens, loss, cfg), ratio
