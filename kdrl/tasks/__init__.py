"""Bundled synthetic reasoning tasks, and the process-level metric each one defines.

The reward stays the verifier on the last ``\\boxed{}``; a task may also say whether a response's
whole reasoning is right (``process_metric``), reported as ``chain_correct`` beside outcome accuracy.
"""
from __future__ import annotations

from typing import Callable, Optional

from kdrl.tasks.chains import (
    SPLITS,
    ChainTaskConfig,
    chain_correct,
    export_jsonl,
    extract_boxed,
    generate_problems,
    is_correct,
    load_jsonl,
    solve,
)
from kdrl.tasks.chains import TASK as CHAINS
from kdrl.tasks import sums
from kdrl.types import Problem

ProcessMetric = Callable[[Problem, str], bool]

# metadata["task"] -> whether a response's whole chain is right
PROCESS_METRICS: dict[str, ProcessMetric] = {CHAINS: chain_correct, sums.TASK_NAME: sums.chain_correct}


def process_metric(problem: Problem) -> Optional[ProcessMetric]:
    """The process-level metric of the problem's task (``metadata["task"]``), None if it has none."""
    return PROCESS_METRICS.get(problem.metadata.get("task"))


__all__ = [
    "PROCESS_METRICS",
    "SPLITS",
    "ChainTaskConfig",
    "ProcessMetric",
    "chain_correct",
    "export_jsonl",
    "extract_boxed",
    "generate_problems",
    "is_correct",
    "load_jsonl",
    "process_metric",
    "solve",
    "sums",
]
