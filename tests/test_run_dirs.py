"""A user's results are never lost or mixed (issue 14, items 1-3): a run directory that holds a
run, a kill during the end-of-run summary, a teacher cache rebuilt over an old one; and the
verifier's timeouts visible in the metrics (item 6)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from kdrl import checkpoint as ckpt
from kdrl.cli import main
from kdrl.config import load_config
from test_bad_input import RECIPE, base_args, fails

RECIPES = Path(__file__).parent.parent / "recipes"


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- 1: a run directory holding a run

def test_fresh_run_into_a_directory_that_holds_a_run(tiny_assets, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", RECIPE, *base_args(tiny_assets, run)]) == 0
    before = {path.name: path.stat().st_mtime_ns for path in run.iterdir()}
    old_final = os.readlink(run / "final")
    capsys.readouterr()

    line = fails(capsys, RECIPE, *base_args(tiny_assets, run), "train.seed=1")
    assert f"log.run_dir={run}: already holds a run" in line
    assert f"--resume {run}" in line and "new log.run_dir" in line and "--overwrite" in line
    assert {path.name: path.stat().st_mtime_ns for path in run.iterdir()} == before, "the old run was touched"

    assert main(["train", RECIPE, *base_args(tiny_assets, run), "train.seed=1", "--overwrite"]) == 0
    assert [r["step"] for r in records(run) if r["kind"] == "train"] == [1], "two runs' metrics are mixed"
    assert load_config(run / "config.yaml").train.seed == 1
    assert os.readlink(run / "final") == old_final  # the same step name, but the new run's checkpoint
    assert ckpt.load_trainer_state(ckpt.latest_checkpoint(run))["step"] == 1


def test_rerun_after_no_complete_checkpoint_is_refused(tiny_assets, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: killed\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "loss": 1.0}\n')
    line = fails(capsys, RECIPE, *base_args(tiny_assets, run))
    assert "already holds a run" in line
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "kind": "train", "loss": 1.0}\n'


def test_an_empty_existing_directory_is_fine(tiny_assets, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert main(["train", RECIPE, *base_args(tiny_assets, run)]) == 0


# ----------------------------------------------------------------------------- 2: killed during the summary

def test_kill_during_the_summary_then_resume_logs_the_final_evaluation_once(tiny_assets, tmp_path, monkeypatch,
                                                                           capsys):
    import kdrl.trainer

    run = tmp_path / "run"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for SIGKILL: nothing after this point runs

    monkeypatch.setattr(kdrl.trainer, "plot_run", killed)
    assert main(["train", RECIPE, *base_args(tiny_assets, run), "log.plot=true"]) == 130
    monkeypatch.undo()
    finals = [r for r in records(run) if r["kind"] == "eval" and r["step"] == 1]
    assert len(finals) == 1
    assert main(["train", "--resume", str(run), "log.plot=false"]) == 0
    again = [r for r in records(run) if r["kind"] == "eval" and r["step"] == 1]
    assert len(again) == 1, "the final evaluation is logged twice"
    assert again[0]["test/accuracy"] == finals[0]["test/accuracy"]


# ----------------------------------------------------------------------------- 3: rebuilding a teacher cache

def cache_args(tiny_overrides: list[str], folder: Path, *extra: str) -> list[str]:
    return ["cache-teacher", str(RECIPES / "lightning_opd.yaml"), *tiny_overrides, "teacher_cache.num_prompts=3",
            "rollout.group_size=2", "rollout.max_new_tokens=8", "--out", str(folder), *extra]


def load_cache(tiny_overrides: list[str], folder: Path, *extra: str):
    from kdrl.data import load_problems
    from kdrl.models import load_tokenizer
    from kdrl.teachers.cache import load_teacher_cache

    config = load_config(RECIPES / "lightning_opd.yaml", tiny_overrides + [
        "teacher_cache.num_prompts=3", "rollout.group_size=2", "rollout.max_new_tokens=8",
        f"teacher_cache.path={folder}", *extra])
    return load_teacher_cache(config, load_problems(config.data.train), load_tokenizer(config.model.student))


def test_rebuild_killed_midway_leaves_the_old_cache_whole(tiny_overrides, tmp_path, monkeypatch):
    import kdrl.teachers.cache as cache_module

    folder = tmp_path / "cache"
    assert main(cache_args(tiny_overrides, folder)) == 0
    old = {name: (folder / name).read_bytes() for name in ("rollouts.safetensors", "manifest.json")}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the kill lands after the new rollouts are written, before the manifest

    monkeypatch.setattr(cache_module.json, "dumps", killed)
    assert main(cache_args(tiny_overrides, folder, "rollout.temperature=0.5")) == 130
    monkeypatch.undo()
    assert {name: (folder / name).read_bytes() for name in old} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"], "a half-built cache was left behind"
    assert load_cache(tiny_overrides, folder).problems  # still this run's cache


def test_rollouts_that_do_not_match_their_manifest_are_refused(tiny_overrides, tmp_path):
    from kdrl.teachers.cache import TeacherCacheError

    first, second = tmp_path / "first", tmp_path / "second"
    assert main(cache_args(tiny_overrides, first)) == 0
    assert main(cache_args(tiny_overrides, second, "teacher_cache.num_prompts=2")) == 0
    shutil.copy(second / "rollouts.safetensors", first / "rollouts.safetensors")  # the old manifest, other rows
    with pytest.raises(TeacherCacheError, match="rollouts.safetensors is not the one its manifest describes"):
        load_cache(tiny_overrides, first)
    manifest = json.loads((first / "manifest.json").read_text())
    del manifest["rollouts_sha256"]  # a cache written before the digest was recorded: the rows still count
    (first / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TeacherCacheError, match=r"holds 4 rows of 'prompt_ids', but its manifest lists 3 problems"):
        load_cache(tiny_overrides, first)


def test_cache_out_a_directory_that_is_not_a_cache(tiny_overrides, tmp_path):
    from kdrl.teachers.cache import build_teacher_cache

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(Exception, match="a directory that is not a teacher cache"):
        build_teacher_cache(load_config(RECIPES / "lightning_opd.yaml", tiny_overrides + [
            f"teacher_cache.path={folder}"]))
    assert (folder / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- 6: timeouts in the metrics

def test_verifier_timeouts_show_in_the_step_metrics(tiny_assets, tmp_path):
    run = tmp_path / "run"
    assert main(["train", RECIPE, *base_args(tiny_assets, run), "reward.functions=[kdrl_test_rewards:times_out]",
                 "rollout.prompts_per_step=2", "rollout.group_size=2"]) == 0
    train = [r for r in records(run) if r["kind"] == "train"]
    assert train[0]["reward_timeouts"] == 4  # every row of the step
    evals = [r for r in records(run) if r["kind"] == "eval"]
    assert all(r["reward_timeouts"] >= 1 for r in evals)


def test_user_reward_returning_none_fails_before_anything_is_written(tiny_assets, tmp_path, capsys):
    run = tmp_path / "run"
    line = fails(capsys, RECIPE, *base_args(tiny_assets, run), "reward.functions=[kdrl_test_rewards:returns_none]")
    assert "reward function kdrl_test_rewards:returns_none returned NoneType None for problem" in line
    assert not run.exists()
