"""Shared fixtures: tiny random models, a tokenizer and data built here, never downloaded."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # tiny matmuls: one thread is much faster here
os.environ.setdefault("OMP_NUM_THREADS", "1")  # and in the CLI subprocesses
sys.path.insert(0, str(Path(__file__).parent))  # test-only user rewards ("kdrl_test_rewards:...")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    """A tiny teacher and student (random Qwen2, shared char tokenizer) and chain-task JSONL splits."""
    from kdrl.demo import build_tokenizer, make_model
    from kdrl.tasks.chains import export_jsonl, generate_problems

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer()
    for name, hidden, layers, seed in (("teacher", 48, 2, 1), ("student", 32, 1, 2)):
        model = make_model(tokenizer, hidden_size=hidden, layers=layers, heads=4, intermediate=2 * hidden, seed=seed)
        model.save_pretrained(root / name, safe_serialization=True)
        tokenizer.save_pretrained(root / name)
    (root / "data").mkdir()
    export_jsonl(generate_problems("train", 64, seed=0), root / "data" / "train.jsonl")
    export_jsonl(generate_problems("test_id", 8, seed=0), root / "data" / "test.jsonl")
    return root


@pytest.fixture
def tiny_overrides(tiny_assets, tmp_path) -> list[str]:
    """Overrides that point any recipe at the tiny assets with a 3-step budget."""
    return [
        f"model.student={tiny_assets / 'student'}",
        f"model.teacher={tiny_assets / 'teacher'}",
        f"data.train={tiny_assets / 'data' / 'train.jsonl'}",
        f"data.eval=[{tiny_assets / 'data' / 'test.jsonl'}]",
        "train.steps=3", "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=12",
        "train.micro_batch_size=4", "train.learning_rate=1e-3", "eval.num_problems=4", "eval.before=false",
        "log.progress=false", "log.plot=false", f"log.run_dir={tmp_path / 'run'}",
    ]
