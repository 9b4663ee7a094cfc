"""Rollout engines behind one small protocol: ``generate(problems, n, sampling) -> Rollouts``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from kdrl.types import Problem, Rollouts


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 64


class RolloutEngine(Protocol):
    def generate(self, problems: list[Problem], n: int, sampling: SamplingParams,
                 prompt_suffixes: list[str] | None = None) -> Rollouts: ...


def _hf_engine(vllm: Any = None, seed: int = 0, **kwargs: Any) -> RolloutEngine:
    from kdrl.rollout.hf import HFRolloutEngine

    return HFRolloutEngine(**kwargs)  # the vllm engine's settings do not apply


def _vllm_engine(**kwargs: Any) -> RolloutEngine:
    from kdrl.rollout.vllm import VLLMRolloutEngine  # imported only when asked: vllm is an optional extra

    return VLLMRolloutEngine(**kwargs)


ENGINES: dict[str, Callable[..., RolloutEngine]] = {"hf": _hf_engine, "vllm": _vllm_engine}


def make_engine(name: str, **kwargs: Any) -> RolloutEngine:
    if name not in ENGINES:
        raise ValueError(f"rollout.engine: unknown engine '{name}' (available: {', '.join(ENGINES)})")
    return ENGINES[name](**kwargs)


def sync_weights(engine: Any, model: Any) -> None:
    """Push the model's current weights into an engine that keeps its own copy (vllm); the hf engine
    generates with the model itself and needs nothing."""
    if hasattr(engine, "sync_weights"):
        engine.sync_weights(model)
