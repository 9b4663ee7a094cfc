"""Rollout engines behind one small protocol, created by name through one registry.

``generate(problems, n, sampling, step=0, prompt_suffixes=None) -> Rollouts`` samples ``n``
responses per problem; ``sync_weights(model)`` is called by the trainer after every optimizer
step (and once after build/resume) so that an engine holding its own copy of the weights (vLLM)
samples from the current student; an engine that reads the live model does nothing.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

from kdrl.types import Problem, Rollouts


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 64


class RolloutEngine(Protocol):
    def generate(self, problems: list[Problem], n: int, sampling: SamplingParams, step: int = 0,
                 prompt_suffixes: Optional[list[str]] = None) -> Rollouts: ...

    def sync_weights(self, model: Any) -> None: ...


# name -> "module:attribute" of the engine class, imported when first asked for (an optional
# dependency such as vLLM is imported only by the runs that use it); ``register_engine`` adds one.
ENGINES: dict[str, str | Callable[..., RolloutEngine]] = {"hf": "kdrl.rollout.hf:HFRolloutEngine",
                                                          "vllm": "kdrl.rollout.vllm:VLLMRolloutEngine"}


def register_engine(name: str, factory: str | Callable[..., RolloutEngine]) -> None:
    """Make ``rollout.engine=name`` build ``factory(**kwargs)`` (a class, or "module:attribute")."""
    ENGINES[name] = factory


def make_engine(name: str, **kwargs: Any) -> RolloutEngine:
    if name not in ENGINES:
        raise ValueError(f"rollout.engine: unknown engine '{name}' (available: {', '.join(ENGINES)})")
    factory = ENGINES[name]
    if isinstance(factory, str):
        module, _, attribute = factory.partition(":")
        factory = getattr(importlib.import_module(module), attribute)
    return factory(**kwargs)


def engine_options(name: str, vllm: Any = None, seed: int = 0, scorer: Any = None) -> dict[str, Any]:
    """The keyword arguments only some engines take: the vllm engine's ``rollout.vllm`` settings
    (None: their defaults), the run's seed, and a scorer of the sampled model (a
    ``kdrl.teachers.LocalTeacher``) that recomputes pi_old where vLLM's own log-probs are not pi_old
    (top_p < 1)."""
    return {"vllm": vllm, "seed": seed, "scorer": scorer} if name == "vllm" else {}
