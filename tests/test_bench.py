"""The method benchmark at toy size, and the evaluation estimators on hand-computed cases."""
from __future__ import annotations

import json
import math

import pytest

from kdrl.evaluate import majority_answer, pass_at_k


@pytest.mark.parametrize("n, c, k, expected", [
    (4, 0, 1, 0.0), (4, 0, 4, 0.0), (4, 4, 1, 1.0), (4, 1, 4, 1.0),  # n = k: 1 iff any correct
    (4, 1, 1, 0.25), (5, 2, 2, 1 - math.comb(3, 2) / math.comb(5, 2)), (10, 3, 5, 1 - math.comb(7, 5) / math.comb(10, 5)),
    (3, 1, 3, 1.0), (8, 6, 3, 1.0),  # fewer wrong than k: every k-subset contains a correct one
])
def test_pass_at_k_hand_cases(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_rejects_bad_counts():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_majority_ties_break_by_first_seen():
    assert majority_answer(["2", "3", "3", "2"]) == "2"
    assert majority_answer([None, "7", None]) == "7"
    assert majority_answer(["1", "2", "2"]) == "2"
    assert majority_answer([None, None]) is None


@pytest.mark.parametrize("jobs", [1, 2])
def test_benchmark_toy(tiny_overrides, tmp_path, jobs):
    from kdrl.bench import run_benchmark

    overrides = [o for o in tiny_overrides if not o.startswith("log.run_dir")] + [
        "train.steps=2", "eval.every=1", "eval.samples=2", "eval.temperature=1.0"]
    results = run_benchmark(["grpo", "kd_rkl"], [0], tmp_path / "bench", overrides, {}, 0.5, "kdrl bench (test)",
                            jobs=jobs, method_pairs=[("kd_rkl", "grpo")])
    assert results["jobs"] == jobs
    table = (tmp_path / "bench" / "table.md").read_text()
    assert "| grpo |" in table and "| kd_rkl |" in table
    assert "pass@2" in table and "response_length" in table and "test/chain_correct" in table
    # the paired comparison, from each run's per-problem results
    per_problem = json.loads((tmp_path / "bench" / "runs" / "grpo-seed0" / "eval_after_problems.json").read_text())
    assert [len(r["correct"]) for r in per_problem["test"]] == [2] * 4  # 4 problems x 2 samples
    assert [(r["a"], r["b"], r["set"], r["metric"]) for r in results["pairs"]] == [
        ("kd_rkl", "grpo", "test", "accuracy"), ("kd_rkl", "grpo", "test", "chain_correct")]
    assert all(r["low"] <= r["difference"] <= r["high"] and r["problems"] == 4 for r in results["pairs"])
    assert "| kd_rkl − grpo | test | accuracy |" in table and results["pairs_without_problems"] == []
    # runs without per-problem results (e.g. from before they were kept) are named, not compared
    (tmp_path / "bench" / "runs" / "grpo-seed0" / "eval_after_problems.json").unlink()
    again = run_benchmark(["grpo", "kd_rkl"], [0], tmp_path / "bench", overrides, {}, 0.5, "kdrl bench (test)",
                          method_pairs=[("kd_rkl", "grpo")])  # read back, not retrained
    assert again["pairs"] == [] and again["pairs_without_problems"] == ["kd_rkl:grpo"]
    assert "Not compared" in (tmp_path / "bench" / "table.md").read_text()
    assert (tmp_path / "bench" / "curves.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert [row["method"] for row in saved["rows"]] == ["grpo", "kd_rkl"]
    for row in saved["rows"]:
        mean, std = row["test/accuracy"]
        assert 0.0 <= mean <= 1.0 and std == 0.0


def test_pairs_must_name_benchmarked_methods(tmp_path):
    from kdrl.bench import run_benchmark
    from kdrl.config import ConfigError

    with pytest.raises(ConfigError, match="kdrl_auto"):
        run_benchmark(["grpo", "kdrl"], [0], tmp_path, [], {}, 0.5, "test", method_pairs=[("kdrl_auto", "kdrl")])
    assert not (tmp_path / "runs").exists()  # refused before anything trained


def test_benchmark_reruns_a_run_killed_part_way(tiny_overrides, tmp_path):
    """A run directory without summary.json (the run was killed) is cleared and trained again,
    not refused as "already holds a run"."""
    from kdrl.bench import run_benchmark
    from kdrl.config import load_config
    from kdrl.trainer import train

    overrides = [o for o in tiny_overrides if not o.startswith("log.run_dir")] + ["train.steps=2"]
    killed = tmp_path / "bench" / "runs" / "grpo-seed0"
    train(load_config("recipes/grpo.yaml", overrides + [f"log.run_dir={killed}"]))
    (killed / "summary.json").unlink()  # as if killed before the end
    results = run_benchmark(["grpo"], [0], tmp_path / "bench", overrides, {}, 0.5, "kdrl bench (test)",
                            method_pairs=[])
    assert (killed / "summary.json").is_file()
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2]  # one run's lines, not two runs' mixed
    assert [row["method"] for row in results["rows"]] == ["grpo"]


def test_benchmark_refuses_to_read_back_a_run_with_another_config(tiny_overrides, tmp_path):
    """Resuming a benchmark with other settings must not put the old runs' numbers under the new
    setting: the finished run's config.yaml is compared with the one asked for, key by key."""
    from kdrl.bench import run_benchmark
    from kdrl.config import ConfigError

    overrides = [o for o in tiny_overrides if not o.startswith("log.run_dir")] + ["train.steps=1"]
    run_benchmark(["grpo"], [0], tmp_path / "bench", overrides, {}, 0.5, "test", method_pairs=[])
    with pytest.raises(ConfigError, match=r"grpo-seed0 holds a finished run with a different config "
                                          r"\(train\.learning_rate\)"):
        run_benchmark(["grpo"], [0], tmp_path / "bench", overrides, {"grpo": ["train.learning_rate=5e-5"]}, 0.5,
                      "test", method_pairs=[])
    again = run_benchmark(["grpo"], [0], tmp_path / "bench", overrides, {}, 0.5, "test", method_pairs=[])
    assert [row["method"] for row in again["rows"]] == ["grpo"]  # the same config is read back
    moved = tmp_path / "moved"
    (tmp_path / "bench").rename(moved)  # a moved results folder is still read back
    assert [row["method"] for row in run_benchmark(["grpo"], [0], moved, overrides, {}, 0.5, "test",
                                                   method_pairs=[])["rows"]] == ["grpo"]


def test_benchmark_table_names_a_methods_own_overrides(tiny_overrides, tmp_path):
    from kdrl.bench import run_benchmark

    overrides = [o for o in tiny_overrides if not o.startswith("log.run_dir")] + ["train.steps=1"]
    run_benchmark(["grpo", "kd_rkl"], [0], tmp_path, overrides, {"grpo": ["train.learning_rate=5e-5"]}, 0.5, "test",
                  method_pairs=[])
    table = (tmp_path / "table.md").read_text()
    assert "| grpo (train.learning_rate=5e-5) |" in table and "| kd_rkl |" in table
