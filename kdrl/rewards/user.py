"""User reward functions (``module:function``): imported, checked, and wrapped so that an
exception inside one scores 0.0 instead of stopping the run."""
from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import math
import threading
from typing import Any, Callable, Optional

from kdrl.rewards.stats import _count, _should_log
from kdrl.rewards.types import ProblemLike

logger = logging.getLogger("kdrl.rewards")

class UserReward:
    """A user reward function made safe: an exception inside it scores 0.0 (logged and
    counted in ``reward_stats()["user_errors"]``). Returning a non-number or a non-finite
    number is a bug in the function and raises ``ValueError`` naming it."""

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
        return _as_finite_float(value, self.name)


def _as_finite_float(value: Any, name: str) -> float:
    if isinstance(value, (str, bytes, complex)) or value is None:
        raise ValueError(f"reward function {name} returned {type(value).__name__} {value!r:.80}; "
                         f"expected a finite real number")
    try:
        out = float(value)
    except Exception as e:
        raise ValueError(f"reward function {name} returned {type(value).__name__}, "
                         f"which is not a number") from e
    if not math.isfinite(out):
        raise ValueError(f"reward function {name} returned non-finite value {out}")
    return out


def load_reward(spec: str) -> UserReward:
    """Import ``"package.module:function"`` (the attribute may be dotted, ``module:obj.fn``)
    and return it wrapped as a safe reward (see ``UserReward``)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"reward spec {spec!r} must look like 'module:function'")
    mod_name, _, attr_path = (p.strip() for p in spec.partition(":"))
    if not mod_name or not attr_path:
        raise ValueError(f"reward spec {spec!r} must look like 'module:function'")
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
    try:
        inspect.signature(obj).bind(None, "")
    except TypeError:
        raise ValueError(f"cannot load reward {spec!r}: it must accept (problem, response)") from None
    except ValueError:
        pass  # no introspectable signature (some builtins): trust it
    return UserReward(obj, name=spec)
