"""The embedded default really teaches: `kdrl train` with no arguments (the KDRL recipe, bundled
student and teacher, bundled sums task) must raise the student's held-out in-distribution accuracy
and its whole-chain correctness.

This is the whole default run (200 steps of 16 prompts x 8 at lr 3e-4; about 3-4 minutes on 2 CPU
cores), evaluated on test_id only. Measured in a fresh clone (README): 21.0% -> 64.5% accuracy and
18.5% -> 62.0% chain correctness at one thread, 66.0% / 63.5% with the start-up probe's thread
choice (greedy, 200 problems). The assertion asks for +25 points in both (the issue's floor is +15):
a collapse, a sign error in the KD term, a broken reward or a halved effect turns it red.
"""
from __future__ import annotations

import json

from kdrl.config import load_config
from kdrl.trainer import train

MARGIN = 0.25  # absolute points the default run must add


def test_default_run_improves_bundled_student(tmp_path):
    config = load_config(None, [
        "data.eval=[bundled:test_id]", "eval.num_problems=200", "train.cpu_threads=1",  # float order fixed
        "log.progress=false", "log.plot=false", "checkpoint.save_final=false", f"log.run_dir={tmp_path / 'run'}",
    ])
    summary = train(config)
    assert summary["after"]["test_id/num_problems"] == 200
    for metric in ("accuracy", "chain_correct"):
        before, after = summary["before"][f"test_id/{metric}"], summary["after"][f"test_id/{metric}"]
        assert after - before >= MARGIN, f"in-distribution {metric} {before:.3f} -> {after:.3f}"


def test_grpo_learns_an_easy_reward_on_the_bundled_student(tmp_path):
    """The policy gradient itself works on the bundled student: rewarding an even final answer, the
    rollout reward must climb by 0.2 within 20 steps."""
    config = load_config("recipes/grpo.yaml", [
        "reward.functions=[kdrl_test_rewards:even_answer]", "train.steps=20", "eval.before=false", "data.eval=[]",
        "train.learning_rate=1e-3", "rollout.prompts_per_step=8",  # its own setting, not the defaults
        "log.progress=false", "log.plot=false", "checkpoint.save_final=false", f"log.run_dir={tmp_path / 'run'}",
    ])
    train(config)
    rewards = [json.loads(line)["reward"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
               if '"train"' in line]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last >= first + 0.2, f"reward {first:.2f} -> {last:.2f}"
