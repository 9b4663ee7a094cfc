"""β chosen by a controller each step (METHODS.md §6 kdrl_auto).

Rule ``kl_target``: PPO's adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language
Models from Human Preferences", §2.2), applied to the KL toward the teacher instead of a reference:

    e_t     = clip(KL_t / KL_target − 1, −ε, ε)
    β_{t+1} = clip(β_t · (1 + K·e_t), β_min, β_max),      β_0 = objective.beta.initial

KL_t is the measured per-token reverse KL(π_θ‖π_T) of update t's batch (token-mean, the
objective's own loss aggregation), before that update's optimizer step. KL_target is given in
nats/token (``target``) or, by default, as a fraction of the first measurement (``target_fraction``
· KL_1), so that it follows the task's scale. In METHODS terms the rule treats β as the Lagrange
multiplier of the constraint KL(π_θ‖π_T) ≤ KL_target on J_GRPO − β·KL: while the student is
further from the teacher than the target, β grows and distillation dominates; once it is closer,
β shrinks toward β_min and the reward takes over ("strong KD early, weaker later", with the
switch-over set by a measurement instead of by hand). ε bounds the relative change of β per
update to ±K·ε, so one noisy batch moves β little. A skipped update (non-finite loss) or a
missing / non-finite measurement leaves β (and KL_1) unchanged.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from kdrl.config import BetaConfig

# The update metric that measures KL(π_θ‖π_T) per token for each KD estimator: the exact reverse
# KL ("rkl") and k3's value are (unbiased estimates of) it; otherwise the sampled k1 log-ratio.
KL_MEASUREMENT = {"rkl": "kd_value", "k3": "kd_value"}
SAMPLED_KL_METRIC = "kl_sampled"


@dataclass
class KLTargetController:
    """β_{t+1} = clip(β_t·(1 + gain·clip(KL_t/target − 1, ±error_clip)), low, high); target =
    ``target``, or ``target_fraction`` × the first measured KL when ``target`` is None."""

    beta: float
    target: Optional[float]
    target_fraction: float
    gain: float
    error_clip: float
    low: float
    high: float
    first_kl: Optional[float] = None  # KL_1, the scale of a relative target (resumed with the checkpoint)
    updates: int = 0  # measurements taken

    def update(self, measured_kl: float) -> float:
        """Take one measurement; return β for the next step."""
        if not math.isfinite(measured_kl):
            return self.beta
        if self.first_kl is None:
            self.first_kl = measured_kl
        target = self.target if self.target is not None else self.target_fraction * self.first_kl
        if target <= 0:  # a first KL of 0: the student already is the teacher; nothing to steer by
            return self.beta
        error = min(max(measured_kl / target - 1.0, -self.error_clip), self.error_clip)
        self.beta = min(max(self.beta * (1.0 + self.gain * error), self.low), self.high)
        self.updates += 1
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta, self.updates = float(state["beta"]), int(state["updates"])
        self.first_kl = None if state.get("first_kl") is None else float(state["first_kl"])


def kl_target(cfg: BetaConfig) -> KLTargetController:
    c = cfg.controller
    beta = min(max(cfg.initial, c.min), c.max)
    return KLTargetController(beta=beta, target=c.target, target_fraction=c.target_fraction, gain=c.gain,
                              error_clip=c.error_clip, low=c.min, high=c.max)


BETA_CONTROLLERS: dict[str, Callable[[BetaConfig], KLTargetController]] = {"kl_target": kl_target}


def measured_kl(metrics: dict[str, float], kd_estimator: str) -> float:
    """KL_t from one update's metrics (NaN when absent, which leaves β unchanged)."""
    return float(metrics.get(KL_MEASUREMENT.get(kd_estimator, SAMPLED_KL_METRIC), math.nan))
