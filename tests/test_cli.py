"""The CLI: user mistakes give one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_kdrl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    return subprocess.run([sys.executable, "-m", "kdrl", *args], capture_output=True, text=True, timeout=180,
                          cwd=cwd, env=env)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_unknown_key_names_it_and_suggests(tmp_path):
    result = run_kdrl("train", "recipes/kdrl.yaml", "objective.betta=0.1", f"log.run_dir={tmp_path / 'r'}")
    line = assert_one_line_error(result, "objective.betta", "did you mean 'beta'")
    assert not (tmp_path / "r").exists(), "nothing is written for a bad recipe"
    assert line.startswith("kdrl: error:")


def test_unknown_key_in_recipe_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("objective:\n  advantage: grpo\n  kd_estimatr: k2\n")
    result = run_kdrl("train", str(recipe))
    assert_one_line_error(result, "objective.kd_estimatr", "kd_estimator", "bad.yaml")


def test_bad_value_names_the_key():
    assert_one_line_error(run_kdrl("train", "rollout.top_p=1.5"), "rollout.top_p", "(0, 1]")
    assert_one_line_error(run_kdrl("train", "objective.beta.initial=-1"), "objective.beta.initial")
    assert_one_line_error(run_kdrl("train", "objective.kd_estimator=k1"), "zero-mean gradient")


def test_malformed_data_row_names_file_and_line(tmp_path, tiny_assets):
    data = tmp_path / "broken.jsonl"
    rows = [json.dumps({"prompt": "1+1=?\n", "answer": "2"}), "{not json", json.dumps({"prompt": "x"})]
    data.write_text("\n".join(rows) + "\n")
    result = run_kdrl("train", f"data.train={data}", f"model.student={tiny_assets / 'student'}",
                      f"model.teacher={tiny_assets / 'teacher'}", f"log.run_dir={tmp_path / 'r'}")
    assert_one_line_error(result, "broken.jsonl:2", "not valid JSON")
    data.write_text(rows[0] + "\n" + rows[2] + "\n")
    result = run_kdrl("train", f"data.train={data}", f"model.student={tiny_assets / 'student'}",
                      f"model.teacher={tiny_assets / 'teacher'}", f"log.run_dir={tmp_path / 'r'}")
    assert_one_line_error(result, "broken.jsonl:2", "missing field 'answer'")
    assert not (tmp_path / "r").exists()


def test_eval_writes_json_and_table(tmp_path, tiny_assets):
    out = tmp_path / "eval.json"
    result = run_kdrl("eval", "--model", f"student={tiny_assets / 'student'}", "--data",
                      str(tiny_assets / "data" / "test.jsonl"), "--samples", "2", "--temperature", "1.0",
                      "--max-new-tokens", "8", "--out", str(out))
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())
    metrics = results["student"]["test"]
    assert {"accuracy", "pass@2", "pass@1", "maj@2", "chain_correct", "response_length"} <= set(metrics)
    assert "| student | test |" in result.stdout and "chain_correct" in result.stdout
    per_problem = json.loads((tmp_path / "eval_problems.json").read_text())["student"]["test"]
    assert len(per_problem) == metrics["num_problems"] and all(len(r["correct"]) == 2 for r in per_problem)
    assert sum(map(sum, (r["correct"] for r in per_problem))) / (2 * len(per_problem)) == metrics["accuracy"]


def test_bench_overrides_after_methods_or_pairs_are_overrides(monkeypatch, tmp_path):
    """`--methods` and `--pairs` take any number of values; a key=value written after them is an
    override, not a method or pair name."""
    import kdrl.bench
    from kdrl.cli import main

    seen = {}

    def fake_run_benchmark(methods, seeds, out, overrides, method_overrides, target, command, jobs=1,
                           method_pairs=None):
        seen.update(methods=methods, overrides=overrides, pairs=method_pairs)
        return {"rows": [], "pairs": [], "methods": methods}

    monkeypatch.setattr(kdrl.bench, "run_benchmark", fake_run_benchmark)
    monkeypatch.setattr(kdrl.bench, "markdown", lambda results: "")
    main(["bench", "--out", str(tmp_path), "--methods", "grpo", "kdrl", "train.steps=60", "--pairs", "kdrl:grpo",
          "eval.samples=4"])
    assert seen == {"methods": ["grpo", "kdrl"], "overrides": ["train.steps=60", "eval.samples=4"],
                    "pairs": [("kdrl", "grpo")]}
