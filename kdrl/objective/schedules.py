"""Schedules of the KD coefficient β over training steps (METHODS.md §5)."""
from __future__ import annotations

import math
from typing import Callable

from kdrl.config import BetaConfig

BetaFn = Callable[[BetaConfig, int, int], float]


def constant(cfg: BetaConfig, step: int, total_steps: int) -> float:
    """β_t = β_0 (KDRL, e.g. 2e-3)."""
    return cfg.initial


def linear(cfg: BetaConfig, step: int, total_steps: int) -> float:
    """β_t = max(β_0 − δ·t, β_min)  (KDRL annealing: 5e-3 → 1e-3, δ = 5e-5)."""
    return max(cfg.initial - cfg.decay_per_step * step, cfg.final)


def cosine(cfg: BetaConfig, step: int, total_steps: int) -> float:
    """β_0 → β_final along half a cosine over ``cosine_steps`` (default: total_steps), then β_final."""
    period = cfg.cosine_steps if cfg.cosine_steps is not None else total_steps
    if step >= period:
        return cfg.final
    progress = step / period
    return cfg.final + (cfg.initial - cfg.final) * 0.5 * (1.0 + math.cos(math.pi * progress))


BETA_SCHEDULES: dict[str, BetaFn] = {"constant": constant, "linear": linear, "cosine": cosine}


def beta_at(cfg: BetaConfig, step: int, total_steps: int) -> float:
    """The KD coefficient at optimizer step ``step`` (0-based)."""
    if cfg.schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {cfg.schedule!r} (valid: {', '.join(BETA_SCHEDULES)})")
    return float(BETA_SCHEDULES[cfg.schedule](cfg, step, total_steps))
