"""Rollout engines behind one small protocol: ``generate(problems, n, sampling) -> Rollouts``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from kdrl.types import Problem, Rollouts


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 64


class RolloutEngine(Protocol):
    def generate(self, problems: list[Problem], n: int, sampling: SamplingParams,
                 prompt_suffixes: list[str] | None = None) -> Rollouts: ...


def make_engine(name: str, **kwargs) -> RolloutEngine:
    from kdrl.rollout.hf import HFRolloutEngine

    engines: dict[str, Callable[..., RolloutEngine]] = {"hf": HFRolloutEngine}
    if name not in engines:
        raise ValueError(f"rollout.engine: unknown engine '{name}' (available: {', '.join(engines)})")
    return engines[name](**kwargs)
