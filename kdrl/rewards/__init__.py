"""Verifiable rewards for RL post-training.

A reward is ``Callable[[Problem, str], float]``: pure, deterministic, and safe on any
response string (never raises, never runs model text as code, never hangs).

    from kdrl.rewards import get_reward, combine_rewards, reward_stats
    reward = combine_rewards([("math", 1.0), ("format", 0.1)], timeout_s=5.0)
    r = reward(problem, response_text)
    reward_stats()  # {"timeouts": ..., "user_errors": ..., ...}

See ``kdrl.rewards.verifiers`` for how the math-verification time limit works in the
main thread (SIGALRM interval timer) and in other threads (worker subprocesses).
"""
from kdrl.rewards.verifiers import (
    DEFAULT_TIMEOUT_S,
    END_MARKERS,
    MAX_ANSWER_CHARS,
    REWARDS,
    ProblemLike,
    RewardFn,
    UserReward,
    combine_rewards,
    exact_match_reward,
    extract_last_boxed,
    format_reward,
    get_reward,
    load_reward,
    math_reward,
    register_reward,
    reset_reward_stats,
    reward_stats,
    shutdown_verifier_workers,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "END_MARKERS",
    "MAX_ANSWER_CHARS",
    "REWARDS",
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
    "register_reward",
    "reset_reward_stats",
    "reward_stats",
    "shutdown_verifier_workers",
]
