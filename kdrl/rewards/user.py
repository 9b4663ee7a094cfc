"""User reward functions (``module:function``): imported, checked, and wrapped so that an
exception inside one scores 0.0 instead of stopping the run."""
from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import math
import sys
import threading
from typing import Any, Callable, Optional

from kdrl.rewards.stats import _count, _should_log
from kdrl.rewards.types import ProblemLike

logger = logging.getLogger("kdrl.rewards")


class RewardError(ValueError):
    """A user reward function cannot be used or broke its contract; the message names it."""


class UserReward:
    """A user reward function made safe: an exception inside it scores 0.0 (logged and
    counted in ``reward_stats()["user_errors"]``). Returning a non-number or a non-finite
    number is a bug in the function: the first such call raises ``RewardError`` naming the
    function, the value and the problem (a run stops rather than train on a made-up reward)."""

    def __init__(self, fn: Callable[..., Any], name: Optional[str] = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", None) or repr(fn)
        self.__name__ = self.name
        self.__doc__ = getattr(fn, "__doc__", None)
        self._errors = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"UserReward({self.name!r})"

    def __call__(self, problem: "ProblemLike", response: str, **kwargs: Any) -> float:
        try:
            value = self.fn(problem, response, **kwargs)
        except Exception:
            _count("user_errors")
            with self._lock:
                self._errors += 1
                n = self._errors
            if _should_log(n):
                logger.warning("reward function %s raised (error #%d); scoring 0.0",
                               self.name, n, exc_info=True)
            return 0.0
        return _as_finite_float(value, self.name, getattr(problem, "id", "?"))


def _as_finite_float(value: Any, name: str, problem_id: str = "?") -> float:
    what = f"reward function {name} returned"
    needed = f"for problem '{problem_id}'; it must return a finite number (e.g. 1.0 or 0.0)"
    if isinstance(value, (str, bytes, complex)) or value is None:
        raise RewardError(f"{what} {type(value).__name__} {repr(value)[:80]} {needed}")
    try:
        out = float(value)
    except Exception:
        raise RewardError(f"{what} a {type(value).__name__}, which is not a number, {needed}") from None
    if not math.isfinite(out):
        raise RewardError(f"{what} {out} (non-finite) {needed}")
    return out


def _refuse(spec: str, why: str) -> RewardError:
    return RewardError(f"cannot load reward {spec!r}: {why}; a reward is your own function "
                       "taking (problem, response) and returning a number")


def _check_takes_problem_and_response(spec: str, obj: Any) -> None:
    """Refuse what cannot be a reward: built-in and standard-library callables (``builtins:exec``,
    ``os:popen`` would run model text), and callables that do not bind (problem, response)."""
    if inspect.isbuiltin(obj) or type(obj).__name__ in ("method-wrapper", "wrapper_descriptor",
                                                       "method_descriptor", "builtin_function_or_method"):
        raise _refuse(spec, "it is a built-in function")
    module = (getattr(obj, "__module__", None) or "").partition(".")[0]
    if module in sys.stdlib_module_names:
        raise _refuse(spec, f"it is part of the Python standard library ({module})")
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        raise _refuse(spec, "its arguments cannot be inspected") from None
    try:
        signature.bind(None, "")
    except TypeError:
        raise _refuse(spec, f"it takes {signature}, not (problem, response)") from None


def load_reward(spec: str) -> UserReward:
    """Import ``"package.module:function"`` (the attribute may be dotted, ``module:obj.fn``)
    and return it wrapped as a safe reward (see ``UserReward``)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"reward spec {spec!r} must look like 'module:function'")
    mod_name, _, attr_path = (p.strip() for p in spec.partition(":"))
    if not mod_name or not attr_path:
        raise ValueError(f"reward spec {spec!r} must look like 'module:function'")
    if mod_name.partition(".")[0] in sys.stdlib_module_names:  # refused before importing it
        raise _refuse(spec, f"{mod_name!r} is a Python standard-library module")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (e.name == mod_name or mod_name.startswith(e.name + ".")):
            raise ValueError(f"cannot load reward {spec!r}: module {mod_name!r} not found "
                             f"(is it on sys.path / PYTHONPATH?)") from e
        raise ValueError(f"cannot load reward {spec!r}: importing {mod_name!r} failed: {e}") from e
    except Exception as e:
        raise ValueError(f"cannot load reward {spec!r}: importing {mod_name!r} failed: "
                         f"{type(e).__name__}: {e}") from e
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
            close = difflib.get_close_matches(attr_path, names, n=1)
            hint = f"; did you mean {mod_name}:{close[0]}?" if close else ""
            raise ValueError(f"cannot load reward {spec!r}: module {mod_name!r} has no "
                             f"attribute {attr_path!r}{hint}") from None
    if not callable(obj):
        raise ValueError(f"cannot load reward {spec!r}: {attr_path!r} is a "
                         f"{type(obj).__name__}, not a callable")
    _check_takes_problem_and_response(spec, obj)
    return UserReward(obj, name=spec)
