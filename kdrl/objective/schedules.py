"""Schedules of the objective's coefficients over training steps: the KD coefficient β
(METHODS.md §5) and the phases that switch the KD and policy-gradient terms on and off
(METHODS.md §6 kd_then_rl). β chosen by a controller instead lives in objective.controllers."""
from __future__ import annotations

import math
from typing import Callable, Optional

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
# not a function of the step: β is the state of a controller fed by the measured KL (objective.controllers)
ADAPTIVE = "adaptive"


def beta_at(cfg: BetaConfig, step: int, total_steps: int) -> float:
    """The KD coefficient at optimizer step ``step`` (0-based)."""
    if cfg.schedule == ADAPTIVE:
        raise ValueError("beta schedule 'adaptive' is set by a controller from measurements, not by the step "
                         "(objective.controllers)")
    if cfg.schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {cfg.schedule!r} (valid: {', '.join(BETA_SCHEDULES)}, {ADAPTIVE})")
    return float(BETA_SCHEDULES[cfg.schedule](cfg, step, total_steps))


# --------------------------------------------------------------------------- phases

# (step, switch step S) -> (factor on β_t, factor on pg_coef)
PhaseFn = Callable[[int, int], tuple[float, float]]


def joint(step: int, switch: int) -> tuple[float, float]:
    """Both terms at every step: J = pg_coef·J_PG − β_t·KL (KDRL, METHODS.md §5)."""
    return 1.0, 1.0


def kd_then_rl(step: int, switch: int) -> tuple[float, float]:
    """Distillation alone for steps t < S (pg_coef_t = 0, β_t = β), then RL alone (pg_coef_t = pg_coef,
    β_t = 0): the sequential schedule of arXiv 2609.04108 (METHODS.md §6 kd_then_rl)."""
    return (1.0, 0.0) if step < switch else (0.0, 1.0)


PHASES: dict[str, PhaseFn] = {"joint": joint, "kd_then_rl": kd_then_rl}


def switch_step(switch_fraction: float, switch: Optional[int], total_steps: int) -> int:
    """S: ``switch`` if given, else round(switch_fraction · total_steps)."""
    return int(switch) if switch is not None else int(round(switch_fraction * total_steps))
