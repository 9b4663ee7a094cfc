"""Verifiable rewards for RL post-training.

A reward is ``Callable[[Problem, str], float]``: pure, deterministic, and safe on any
response string (never raises, never runs model text as code, never hangs).

    from kdrl.rewards import get_reward, combine_rewards, reward_stats
    reward = combine_rewards([("math", 1.0), ("format", 0.1)], timeout_s=5.0)
    r = reward(problem, response_text)
    reward_stats()  # {"timeouts": ..., "user_errors": ..., ...}

By concern: ``extract`` (the last boxed answer), ``mathcheck`` (math-verify under an alarm),
``timelimit`` (where a verification runs so its limit holds: the alarm, worker subprocesses),
``builtin`` (math, exact, format), ``user`` (``module:function`` rewards), ``registry`` (names,
weighted sums, ``reward.functions`` specs), ``stats`` (counters).
"""
from kdrl.rewards.builtin import END_MARKERS, exact_match_reward, format_reward, math_reward
from kdrl.rewards.extract import extract_last_boxed
from kdrl.rewards.registry import REWARDS, combine_rewards, get_reward, parse_reward_specs, register_reward
from kdrl.rewards.stats import reset_reward_stats, reward_stats
from kdrl.rewards.timelimit import shutdown_verifier_workers
from kdrl.rewards.types import DEFAULT_TIMEOUT_S, MAX_ANSWER_CHARS, ProblemLike, RewardFn
from kdrl.rewards.user import RewardError, UserReward, load_reward

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "END_MARKERS",
    "MAX_ANSWER_CHARS",
    "REWARDS",
    "RewardError",
    "ProblemLike",
    "RewardFn",
    "UserReward",
    "combine_rewards",
    "exact_match_reward",
    "extract_last_boxed",
    "format_reward",
    "get_reward",
    "load_reward",
    "math_reward",
    "parse_reward_specs",
    "register_reward",
    "reset_reward_stats",
    "reward_stats",
    "shutdown_verifier_workers",
]
