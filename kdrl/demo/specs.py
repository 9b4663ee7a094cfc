"""What the bundle is made of at each scale: model sizes, training budgets, data sizes.

``full`` built the shipped ``kdrl/assets/demo`` (its manifest records these numbers); ``toy`` is
the seconds-long build the tests run.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelSpec:
    hidden_size: int
    layers: int
    heads: int
    intermediate: int
    kv_heads: int | None = None


@dataclass
class TrainSpec:
    steps: int
    batch_size: int
    lr: float
    warmup: int
    n_examples: int  # distinct training problems the model sees
    eval_every: int = 0
    stop_at: float | None = None  # early stop once validation accuracy reaches this
    stop_min_step: int = 0  # ... but not before this step


SCALES = {
    "full": {
        "n_train": 2000, "n_test_id": 500, "n_test_ood": 500, "n_val": 200, "max_new_tokens": 64,
        # head_dim 32 in both (vLLM's CPU attention supports 32 and 64); student/teacher ~0.2 in size
        "teacher": ModelSpec(hidden_size=128, layers=4, heads=4, intermediate=512),
        "student": ModelSpec(hidden_size=64, layers=3, heads=2, intermediate=256),
        # The teacher stops once it solves 85% of validation sums (it would reach ~100%).
        "teacher_train": TrainSpec(steps=1200, batch_size=64, lr=3e-3, warmup=100, n_examples=50000,
                                   eval_every=50, stop_at=0.85),
        # The student stops as soon as it solves 22% of validation sums (guessing gets ~1%): it
        # writes the format and copies operands, and gets part of the carries right, so that
        # the outcome reward alone (GRPO) has successes to learn from in most groups.
        "student_train": TrainSpec(steps=1200, batch_size=64, lr=3e-3, warmup=100, n_examples=50000,
                                   eval_every=25, stop_at=0.22, stop_min_step=100),
    },
    "toy": {
        "n_train": 32, "n_test_id": 16, "n_test_ood": 16, "n_val": 8, "max_new_tokens": 24,
        "teacher": ModelSpec(hidden_size=32, layers=2, heads=2, intermediate=64),
        "student": ModelSpec(hidden_size=16, layers=1, heads=2, intermediate=32),
        "teacher_train": TrainSpec(steps=8, batch_size=16, lr=3e-3, warmup=2, n_examples=128,
                                   eval_every=4, stop_at=1.0),
        "student_train": TrainSpec(steps=4, batch_size=16, lr=3e-3, warmup=2, n_examples=128),
    },
}


ROLES = ("teacher", "student")
