"""The one protocol every teacher kind follows (the trainer and the checkpoint ask nothing else)."""
from __future__ import annotations

from typing import Any, Protocol

from kdrl.types import Rollouts, TeacherOutput


class Teacher(Protocol):
    """Scores the student's tokens. Subclass it to inherit the no-op defaults below."""

    def score(self, rollouts: Rollouts, need_hidden: bool = False) -> TeacherOutput: ...

    def after_update(self) -> None:
        """Called after every optimizer step (an EMA self-teacher follows the student); fixed teachers: nothing."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep to resume this teacher exactly (nothing for a fixed teacher)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s output (nothing to restore for a fixed teacher)."""
