"""Reliability: exact resume after SIGKILL, atomic checkpoints, non-finite steps.

The kill tests run ``python -m kdrl train`` in a subprocess and kill it with SIGKILL, the way a
cluster pre-empts a job; the resumed run must log the same per-step metrics as a run that was
never interrupted (CPU, fixed seed).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdrl import checkpoint as ckpt
from kdrl.cli import main

ROOT = Path(__file__).parent.parent
RECIPE = str(ROOT / "recipes" / "kdrl.yaml")
STEPS = 6
NOT_COMPARED = ("time_", "tokens_per_second")  # wall-clock measurements differ between runs


def env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    # one thread: much faster for tiny models here, and the same in every run compared
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def run_args(assets: Path, run_dir: Path, *extra: str) -> list[str]:
    """Six steps on the tiny models, a checkpoint every 2; the eval before training and every 2
    steps samples (temperature 1) so it draws random numbers between checkpoints too."""
    return [
        "train", RECIPE,
        f"model.student={assets / 'student'}", f"model.teacher={assets / 'teacher'}",
        f"data.train={assets / 'data' / 'train.jsonl'}", f"data.eval=[{assets / 'data' / 'test.jsonl'}]",
        f"train.steps={STEPS}", "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=12",
        "train.micro_batch_size=4", "train.learning_rate=1e-3", "train.lr_schedule=cosine",
        "reward.functions=[kdrl_test_rewards:char_parity]",
        "eval.before=true", "eval.every=2", "eval.num_problems=2", "eval.temperature=1.0",
        "checkpoint.every=2", "checkpoint.keep_last=3", "log.sample_every=1",
        "log.progress=false", "log.plot=false", f"log.run_dir={run_dir}", *extra,
    ]


def kdrl(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdrl", *args], capture_output=True, text=True, timeout=timeout,
                          env=env(), cwd=ROOT)


def records(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines() if line.strip()]


def comparable(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(NOT_COMPARED)} for r in records(run_dir)]


def assert_same_metrics(resumed: Path, reference: Path) -> None:
    got, want = comparable(resumed), comparable(reference)
    assert [(r["step"], r["kind"]) for r in got] == [(r["step"], r["kind"]) for r in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys(), (a["step"], a.keys() ^ b.keys())
        for key in b:
            if isinstance(b[key], float):
                assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-7), (a["step"], a["kind"], key,
                                                                                   a[key], b[key])
            else:
                assert a[key] == b[key], (a["step"], a["kind"], key, a[key], b[key])
    assert records(resumed, "samples.jsonl") == records(reference, "samples.jsonl")


def wait_for(predicate, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the run ended (rc {process.returncode}) before it could be killed:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("timed out waiting for the run")
        time.sleep(0.02)


def logged_past_checkpoint(run_dir: Path) -> bool:
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None or step_of(latest) < 2 or not (run_dir / "metrics.jsonl").is_file():
        return False
    steps = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass  # a line being written
    return max(steps, default=0) > step_of(latest)


def kill(process: subprocess.Popen) -> None:
    assert process.poll() is None, "the run finished before the kill"
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL


def step_of(path: Path) -> int:
    return int(path.name.split("-")[-1])


@pytest.fixture(scope="module")
def reference_run(tiny_assets, tmp_path_factory) -> Path:
    """The uninterrupted run the resumed ones must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = kdrl(*run_args(tiny_assets, run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    kinds = [(r["step"], r["kind"]) for r in records(run_dir)]
    assert kinds[0] == (0, "eval") and kinds.count((0, "eval")) == 1
    assert [s for s, k in kinds if k == "train"] == list(range(1, STEPS + 1))
    return run_dir


def test_sigkill_then_resume_matches_uninterrupted_run(reference_run, tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "kdrl", *run_args(tiny_assets, run_dir)], env=env(),
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # kill once a checkpoint at step >= 2 is complete and a later step is already logged, so the
    # resumed run must both drop those records and redo those steps exactly
    wait_for(lambda: logged_past_checkpoint(run_dir), process)
    kill(process)
    assert not (run_dir / "summary.json").exists()
    resumed_from = ckpt.latest_checkpoint(run_dir)
    assert resumed_from is not None and step_of(resumed_from) < STEPS
    assert max(r["step"] for r in records(run_dir)) > step_of(resumed_from)

    result = kdrl("train", "--resume", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_metrics(run_dir, reference_run)
    summary = json.loads((run_dir / "summary.json").read_text())
    reference_summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["before"] == reference_summary["before"]  # read back, not re-run
    assert (run_dir / "final").resolve().name == ckpt.step_name(STEPS)


def test_trainer_state_loads_weights_only_and_restores_rng(reference_run):
    import random

    state = ckpt.load_trainer_state(ckpt.latest_checkpoint(reference_run))  # torch.load(weights_only=True)
    assert state["step"] == STEPS and state["prompt_order"]["position"] == STEPS * 2
    assert {"optimizer", "scheduler", "nonfinite_streak", "rng"} <= set(state)
    saved_python, saved_torch = random.getstate(), torch.get_rng_state()
    try:
        ckpt.set_rng_state(state["rng"])
        draws = (random.random(), torch.rand(3))
        ckpt.set_rng_state(state["rng"])
        assert draws[0] == random.random() and torch.equal(draws[1], torch.rand(3))
        assert isinstance(random.getstate()[1], tuple)
    finally:
        random.setstate(saved_python)
        torch.set_rng_state(saved_torch)


def test_keep_last_prunes_old_checkpoints(reference_run):
    names = [p.name for p in ckpt.complete_checkpoints(reference_run)]
    assert names == [ckpt.step_name(s) for s in (2, 4, 6)]  # keep_last=3 of 2, 4, 6 (the final one not doubled)
    assert not list(ckpt.checkpoint_dir(reference_run).glob(".*"))  # no temporary or retired leftovers


DRIVER = '''
"""Run the kdrl CLI with a save that stops, files half-written, on its second checkpoint."""
import os, sys, time
from pathlib import Path

import kdrl.checkpoint as checkpoint

real_save_model = checkpoint.save_model
calls = []


def slow_save_model(model, tokenizer, path, state_dict=None):
    real_save_model(model, tokenizer, path, state_dict=state_dict)  # the weights and tokenizer files are written...
    calls.append(path)
    if len(calls) == 2:  # ...but not the trainer state, nor the COMPLETE marker
        Path(os.environ["KDRL_TEST_SIGNAL"]).write_text(str(path))
        time.sleep(600)


checkpoint.save_model = slow_save_model
from kdrl.cli import main

sys.exit(main(sys.argv[1:]))
'''


def test_kill_during_save_keeps_previous_checkpoint(reference_run, tiny_assets, tmp_path):
    from transformers import AutoModelForCausalLM

    driver = tmp_path / "slow_save_driver.py"
    driver.write_text(DRIVER)
    signal_file = tmp_path / "saving"
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, str(driver), *run_args(tiny_assets, run_dir)], cwd=ROOT,
                               env={**env(), "KDRL_TEST_SIGNAL": str(signal_file)}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for(signal_file.exists, process)
    kill(process)

    half_written = Path(signal_file.read_text())
    assert half_written.parent == ckpt.checkpoint_dir(run_dir) and half_written.name.startswith(ckpt.TEMP_PREFIX)
    assert (half_written / "model.safetensors").is_file() and not (half_written / ckpt.COMPLETE_MARKER).exists()
    assert [p.name for p in ckpt.complete_checkpoints(run_dir)] == [ckpt.step_name(2)]
    previous = ckpt.latest_checkpoint(run_dir)
    assert previous.name == ckpt.step_name(2)
    AutoModelForCausalLM.from_pretrained(str(previous))  # whole and loadable
    assert ckpt.load_trainer_state(previous)["step"] == 2
    assert (run_dir / "final").resolve() == previous.resolve()

    result = kdrl("train", "--resume", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not half_written.exists(), "the half-written save is cleaned by the next save"
    assert [p.name for p in ckpt.complete_checkpoints(run_dir)] == [ckpt.step_name(s) for s in (2, 4, 6)]
    assert_same_metrics(run_dir, reference_run)


def test_resave_same_step_replaces_atomically(tiny_assets, tmp_path):
    from kdrl.models import load_tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_assets / "student"))
    tokenizer = load_tokenizer(str(tiny_assets / "student"))
    first = ckpt.save_checkpoint(tmp_path, 3, model, tokenizer, {"note": "first"}, keep_last=2)
    second = ckpt.save_checkpoint(tmp_path, 3, model, tokenizer, {"note": "second"}, keep_last=2)
    assert first == second and ckpt.load_trainer_state(second)["note"] == "second"
    assert [p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir()] == [ckpt.step_name(3)]
    # a save killed before its marker (any process's leftovers) is never listed as complete
    (ckpt.checkpoint_dir(tmp_path) / f"{ckpt.TEMP_PREFIX}00000009-1").mkdir()
    (ckpt.checkpoint_dir(tmp_path) / ckpt.step_name(8)).mkdir()  # no marker, no state
    assert ckpt.latest_checkpoint(tmp_path) == second


# ----------------------------------------------------------------------------- non-finite steps

def tiny_train_args(assets: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "train", RECIPE, f"model.student={assets / 'student'}", f"model.teacher={assets / 'teacher'}",
        f"data.train={assets / 'data' / 'train.jsonl'}", "data.eval=[]", "rollout.prompts_per_step=2",
        "rollout.group_size=4", "rollout.max_new_tokens=8", "train.micro_batch_size=8", "train.learning_rate=1e-2",
        "reward.functions=[kdrl_test_rewards:char_parity]", "log.progress=false", "log.plot=false",
        f"log.run_dir={run_dir}", *extra,
    ]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nonfinite_loss_skips_steps_then_stops(tiny_assets, tmp_path, monkeypatch, capsys):
    from kdrl.objective import Objective

    real_prepare, real_loss = Objective.prepare, Objective.loss
    current = {}

    def prepare(self, batch, step):
        current["step"] = step + 1  # the step number the metrics record will carry
        return real_prepare(self, batch, step)

    def loss(self, batch, student, off_policy=False):
        value, metrics = real_loss(self, batch, student, off_policy)
        if current["step"] >= 3:  # the KD term turns NaN from step 3 on
            metrics["kd_loss"] = metrics["kd_loss"] * float("nan")
            value = value * float("nan")
        return value, metrics

    monkeypatch.setattr(Objective, "prepare", prepare)
    monkeypatch.setattr(Objective, "loss", loss)
    run_dir = tmp_path / "run"
    code = main(tiny_train_args(tiny_assets, run_dir, "train.steps=8", "train.max_nonfinite_skips=3",
                                "checkpoint.every=1", "checkpoint.keep_last=10"))
    out, err = capsys.readouterr()
    assert code == 3
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("kdrl: stopped: 3 consecutive non-finite steps (last: kd_loss at step 5)"), lines[0]
    for step in (3, 4, 5):
        assert f"kdrl: step {step}: non-finite kd_loss; optimizer step skipped" in out
    train = [r for r in records(run_dir) if r["kind"] == "train"]
    assert [(r["step"], r["skipped"], r.get("nonfinite_term")) for r in train] == [
        (1, 0.0, None), (2, 0.0, None), (3, 1.0, "kd_loss"), (4, 1.0, "kd_loss"), (5, 1.0, "kd_loss")]
    # the skipped steps left the weights as they were after step 2; the stop wrote no bad checkpoint
    saved = {step_of(p): p for p in ckpt.complete_checkpoints(run_dir)}
    assert sorted(saved) == [1, 2, 3, 4]
    assert not same_weights(saved[1], saved[2])
    assert same_weights(saved[2], saved[3]) and same_weights(saved[2], saved[4])
    assert ckpt.load_trainer_state(saved[4])["nonfinite_streak"] == 2
    assert not (run_dir / "summary.json").exists()


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, value):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_nonfinite_gradient_stops_and_saves_last_good_state(tiny_assets, tmp_path, monkeypatch, capsys):
    from kdrl.objective import Objective

    real_loss = Objective.loss
    monkeypatch.setattr(Objective, "loss", lambda self, batch, student, off_policy=False: (
        lambda out: (NanGradient.apply(out[0]), out[1]))(real_loss(self, batch, student, off_policy)))
    run_dir = tmp_path / "run"
    code = main(tiny_train_args(tiny_assets, run_dir, "train.steps=5", "train.max_nonfinite_skips=2"))
    out, err = capsys.readouterr()
    assert code == 3, err
    assert err.strip().startswith("kdrl: stopped: 2 consecutive non-finite steps (last: gradient at step 2)"), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    train = [r for r in records(run_dir) if r["kind"] == "train"]
    assert all(r["skipped"] == 1.0 and r["nonfinite_term"] == "gradient" for r in train) and len(train) == 2
    assert all(math.isfinite(r["loss"]) for r in train)  # the loss itself was finite
    # no checkpoint existed: the last good state (here the initial weights) is saved, resumable
    [saved] = ckpt.complete_checkpoints(run_dir)
    assert step_of(saved) == 2 and same_weights(saved, tiny_assets / "student")
    assert ckpt.load_trainer_state(saved)["nonfinite_streak"] == 0
    assert (run_dir / "final").resolve() == saved.resolve()


# ----------------------------------------------------------------------------- LoRA

def test_lora_student_resumes_exactly(tiny_assets, tmp_path, capsys):
    """A LoRA student resumes as base + its saved adapter (not the merged weights plus a fresh
    adapter, which would lose the adapter's optimizer state and change every later step)."""
    args = tiny_train_args(tiny_assets, tmp_path / "full", "train.steps=4", "checkpoint.every=2",
                           "model.lora.enabled=true", "model.lora.r=4", "log.sample_every=0")
    assert main(args) == 0
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "full", interrupted, symlinks=True)
    shutil.rmtree(ckpt.checkpoint_dir(interrupted) / ckpt.step_name(4))  # as if killed before step 4's save
    assert main(["train", "--resume", str(interrupted)]) == 0
    capsys.readouterr()
    got, want = comparable(interrupted), comparable(tmp_path / "full")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    for a, b in zip(got[2:], want[2:]):
        for key in ("loss", "grad_norm", "kd_value", "reward", "response_length"):
            assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-7), (a["step"], key, a[key], b[key])
    assert same_weights(interrupted / "final", tmp_path / "full" / "final")
