"""What a reward is, and the limits every reward shares."""
from __future__ import annotations

from typing import Callable, Optional, Protocol

DEFAULT_TIMEOUT_S = 5.0
# Extracted answers longer than this are scored 0.0 without calling math-verify.
MAX_ANSWER_CHARS = 1000
# Rewards read only a response's last this-many characters (the final answer is at its end), so
# a runaway 5 MB response costs what a 100 kB one does. 100 kB is ~25k tokens, above any
# rollout.max_new_tokens the recipes use.
MAX_RESPONSE_CHARS = 100_000


class ProblemLike(Protocol):
    """What the rewards read from a problem (``kdrl.types.Problem`` satisfies it)."""

    id: str
    prompt: str
    answer: str
    solution: Optional[str]
    metadata: dict


RewardFn = Callable[["ProblemLike", str], float]
