"""Counters of what the rewards did (fast path, timeouts, user-function errors), shared by every
reward in the process and read by the training loop's metrics."""
from __future__ import annotations

import threading

_STATS_LOCK = threading.Lock()
_STAT_KEYS = (
    "math_calls",  # math verifications requested (a boxed answer was found)
    "fast_path",  # answered by normalized string equality, math-verify skipped
    "too_long",  # answer longer than MAX_ANSWER_CHARS, scored 0.0
    "timeouts",  # verification hit the time limit, scored 0.0
    "errors",  # unexpected internal failure of a built-in reward, scored 0.0
    "user_errors",  # exception raised inside a user reward function, scored 0.0
)
_STATS = dict.fromkeys(_STAT_KEYS, 0)


def _count(key: str) -> int:
    with _STATS_LOCK:
        _STATS[key] += 1
        return _STATS[key]


def reward_stats() -> dict[str, int]:
    """A snapshot of the reward counters (timeouts, user-function errors, ...)."""
    with _STATS_LOCK:
        return dict(_STATS)


def reset_reward_stats() -> dict[str, int]:
    """Zero the counters; returns the values they had."""
    with _STATS_LOCK:
        old = dict(_STATS)
        for k in _STATS:
            _STATS[k] = 0
        return old


def _should_log(n: int) -> bool:
    """Rate limit: log the first 10 occurrences, then every 100th."""
    return n <= 10 or n % 100 == 0
