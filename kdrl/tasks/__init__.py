"""Bundled synthetic reasoning tasks."""

from kdrl.tasks.chains import (
    SPLITS,
    ChainTaskConfig,
    export_jsonl,
    extract_boxed,
    generate_problems,
    is_correct,
    load_jsonl,
    solve,
)

__all__ = [
    "SPLITS",
    "ChainTaskConfig",
    "export_jsonl",
    "extract_boxed",
    "generate_problems",
    "is_correct",
    "load_jsonl",
    "solve",
]
