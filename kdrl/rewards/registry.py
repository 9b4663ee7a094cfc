"""Reward names -> functions, and their weighted sum (``reward.functions``)."""
from __future__ import annotations

import difflib
import inspect
import math
import numbers
from typing import Any, Callable, Union

from kdrl.rewards.builtin import exact_match_reward, format_reward, math_reward
from kdrl.rewards.timelimit import _check_timeout
from kdrl.rewards.types import DEFAULT_TIMEOUT_S, ProblemLike
from kdrl.rewards.user import UserReward, load_reward

REWARDS: dict[str, Callable[..., float]] = {
    "math": math_reward,
    "exact": exact_match_reward,
    "format": format_reward,
}
_BUILTIN_REWARDS = frozenset(REWARDS.values())


def register_reward(name: str, fn: Callable[..., Any]) -> None:
    """Add a named reward to ``REWARDS`` (wrapped as a safe ``UserReward``)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"reward name must be a non-empty string without ':', got {name!r}")
    if not callable(fn):
        raise ValueError(f"reward {name!r} must be callable, got {type(fn).__name__}")
    REWARDS[name] = fn if isinstance(fn, UserReward) else UserReward(fn, name=name)


def _accepts_timeout(fn: Callable[..., Any]) -> bool:
    target = fn.fn if isinstance(fn, UserReward) else fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    p = params.get("timeout_s")
    return p is not None and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)


def get_reward(spec: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Callable[["ProblemLike", str], float]:
    """Resolve a registry name (``REWARDS``) or ``"module:function"`` to a reward.

    Rewards that take a ``timeout_s`` keyword (``"math"``) get ``timeout_s`` bound.
    """
    timeout_s = _check_timeout(timeout_s)
    if not isinstance(spec, str):
        raise ValueError(f"reward spec must be a string, got {type(spec).__name__}")
    spec = spec.strip()
    if spec in REWARDS:
        fn = REWARDS[spec]
        if fn not in _BUILTIN_REWARDS and not isinstance(fn, UserReward):
            fn = UserReward(fn, name=spec)
        name = spec
    elif ":" in spec:
        fn = load_reward(spec)
        name = spec
    else:
        valid = sorted(REWARDS)
        close = difflib.get_close_matches(spec, valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown reward {spec!r}: valid names are {', '.join(valid)} "
                         f"(or 'module:function' for a user function){hint}")
    if not _accepts_timeout(fn):
        return fn

    def bound(problem: "ProblemLike", response: str) -> float:
        return fn(problem, response, timeout_s=timeout_s)

    bound.__name__ = bound.__qualname__ = name
    bound.__doc__ = fn.__doc__
    bound.timeout_s = timeout_s  # type: ignore[attr-defined]
    return bound


def combine_rewards(specs_with_weights: list[tuple[Union[str, Callable[..., Any]], float]],
                    timeout_s: float = DEFAULT_TIMEOUT_S) -> Callable[["ProblemLike", str], float]:
    """Weighted sum of rewards, e.g. ``[("math", 1.0), ("format", 0.1)]``.

    A spec is a registry name, ``"module:function"``, or a callable (wrapped safely).
    """
    timeout_s = _check_timeout(timeout_s)
    if not specs_with_weights:
        raise ValueError("combine_rewards needs at least one (spec, weight) pair")
    parts: list[tuple[Callable[..., float], float, str]] = []
    for item in specs_with_weights:
        try:
            spec, weight = item
        except (TypeError, ValueError):
            raise ValueError(f"expected (spec, weight) pairs, got {item!r}") from None
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ValueError(f"weight for reward {spec!r} must be a finite number, got {weight!r}")
        if isinstance(spec, str):
            fn, name = get_reward(spec, timeout_s), spec.strip()
        elif callable(spec):
            fn = spec if isinstance(spec, UserReward) else UserReward(spec)
            name = fn.name
        else:
            raise ValueError(f"reward spec must be a name, 'module:function' or callable, got {spec!r}")
        parts.append((fn, float(weight), name))

    def combined(problem: "ProblemLike", response: str) -> float:
        return float(sum(w * fn(problem, response) for fn, w, _ in parts))

    combined.__name__ = combined.__qualname__ = "+".join(
        n if w == 1.0 else f"{w:g}*{n}" for _, w, n in parts)
    combined.parts = [(n, w) for _, w, n in parts]  # type: ignore[attr-defined]
    return combined


def parse_reward_specs(specs: list[str]) -> list[tuple[str, float]]:
    """``reward.functions`` entries: ``"math"`` or ``"format*0.1"`` -> (name, weight)."""
    parsed = []
    for spec in specs:
        name, _, weight = spec.partition("*")
        try:
            parsed.append((name.strip(), float(weight) if weight else 1.0))
        except ValueError:
            raise ValueError(f"bad weight in '{spec}' (use name*weight, e.g. format*0.1)") from None
    return parsed
