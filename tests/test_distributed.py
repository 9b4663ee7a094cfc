"""Two gloo processes (FSDP2) give the one-process loss, gradients and checkpoint on one global batch."""
from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from kdrl.config import load_config
from kdrl.types import Rollouts

PROMPTS, GROUP = 4, 2


def _overrides(tiny_overrides: list[str], run_dir: Path) -> list[str]:
    return [o for o in tiny_overrides if not o.startswith("log.run_dir")] + [
        f"log.run_dir={run_dir}", "train.steps=1", f"rollout.prompts_per_step={PROMPTS}",
        f"rollout.group_size={GROUP}", "train.micro_batch_size=2", "train.warmup_steps=0",
        "objective.kd_estimator=rkl", "objective.chunk_size=5", "train.max_grad_norm=1e9", "train.device=cpu",
        # kdrl_auto's β controller (β_0 = 1, as the constant default) measures the KL after the update
        "objective.beta.schedule=adaptive"]


def rows_share(rollouts: Rollouts, start: int, stop: int) -> Rollouts:
    """Problems [start, stop) and their groups' rows."""
    rows = slice(start * rollouts.group_size, stop * rollouts.group_size)
    return replace(rollouts, problems=rollouts.problems[start:stop], prompt_ids=rollouts.prompt_ids[rows],
                   prompt_mask=rollouts.prompt_mask[rows], response_ids=rollouts.response_ids[rows],
                   response_mask=rollouts.response_mask[rows], sampler_logprobs=rollouts.sampler_logprobs[rows],
                   response_texts=rollouts.response_texts[rows], truncated=rollouts.truncated[rows],
                   sources=rollouts.sources[rows])


def learn_one_step(overrides: list[str], rollouts_file: Path) -> tuple[dict, dict, dict]:
    """The trainer's step on the saved global batch (this rank's share), then a checkpoint."""
    from kdrl.build import build
    from kdrl.rollout.rows import score_rewards
    from kdrl.trainer import make_batch, save, update
    from kdrl.distributed import reduce_metrics

    run = build(load_config(None, overrides))
    share = run.dist.share(PROMPTS)
    rollouts = rows_share(torch.load(rollouts_file, weights_only=False), share.start, share.stop)
    rewards = score_rewards(run.reward_fn, rollouts)
    teacher = run.teacher_scorer.score(rollouts, need_hidden=run.objective.needs_teacher_hidden)
    batch = run.objective.prepare(make_batch(rollouts, rewards, teacher, None), run.step)
    metrics = reduce_metrics(update(run, batch), run.dist)
    grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
             for name, p in run.student.named_parameters()}
    run.step += 1
    save(run)
    return metrics, grads, run.objective.state_dict()


def _worker(rank: int, world: int, port: int, overrides: list[str], rollouts_file: Path, result_file: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from kdrl.distributed import close_distributed

    try:
        metrics, grads, objective_state = learn_one_step(overrides, rollouts_file)
        if rank == 0:
            torch.save((metrics, grads), result_file)
        torch.save(objective_state, result_file.with_name(f"objective-{rank}.pt"))
    except BaseException as error:  # reported to the parent
        torch.save(repr(error), result_file.with_name(f"error-{rank}.pt"))
        raise
    finally:
        close_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(tiny_overrides, tmp_path):
    from kdrl.build import build

    # One global batch of rollouts, sampled once and shared by both runs.
    sampler = build(load_config(None, _overrides(tiny_overrides, tmp_path / "sampler")))
    from kdrl.rollout import SamplingParams

    torch.manual_seed(3)
    rollouts = sampler.sampling_source.generate(sampler.train_problems[:PROMPTS], GROUP, SamplingParams(1.0, 1.0, 12))
    assert rollouts.response_mask.sum(-1).unique().numel() > 1  # responses of different lengths
    rollouts_file = tmp_path / "rollouts.pt"
    torch.save(rollouts, rollouts_file)

    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    context = mp.get_context("spawn")
    port, result_file = _free_port(), tmp_path / "result.pt"
    workers = [context.Process(target=_worker, args=(rank, 2, port, _overrides(tiny_overrides, two_dir),
                                                     rollouts_file, result_file)) for rank in range(2)]
    for worker in workers:
        worker.start()
    one_metrics, one_grads, one_objective = learn_one_step(_overrides(tiny_overrides, one_dir), rollouts_file)
    for worker in workers:
        worker.join(timeout=120)
    errors = [torch.load(f, weights_only=False) for f in sorted(tmp_path.glob("error-*.pt"))]
    assert not errors and all(worker.exitcode == 0 for worker in workers), (errors, [w.exitcode for w in workers])
    two_metrics, two_grads = torch.load(result_file, weights_only=False)

    for key in ("loss", "pg_loss", "kd_loss", "kd_value", "entropy", "grad_norm"):
        assert two_metrics[key] == pytest.approx(one_metrics[key], rel=1e-5, abs=1e-6), key
    assert one_metrics["kd_loss"] > 0 and one_metrics["grad_norm"] > 0
    assert one_grads.keys() == two_grads.keys()
    # each rank measured its share of the KL; summed over ranks, both see the one-process KL and β
    two_objective = [torch.load(tmp_path / f"objective-{rank}.pt") for rank in range(2)]
    assert one_objective["beta_controller"]["beta"] != 1.0
    for state in two_objective:
        assert state["beta_controller"]["beta"] == pytest.approx(one_objective["beta_controller"]["beta"], rel=1e-9)
        assert state["beta_controller"]["first_kl"] == pytest.approx(one_metrics["kd_value"], rel=1e-5)
    for name in one_grads:
        torch.testing.assert_close(two_grads[name], one_grads[name], rtol=1e-4, atol=1e-5, msg=name)

    # The same checkpoint: Hugging Face weights written once, and an optimizer state that a
    # different number of processes (here one) resumes from.
    one_ckpt, two_ckpt = (d / "checkpoints" / "step-00000001" for d in (one_dir, two_dir))
    one_weights, two_weights = load_file(one_ckpt / "model.safetensors"), load_file(two_ckpt / "model.safetensors")
    assert one_weights.keys() == two_weights.keys()
    for name in one_weights:
        torch.testing.assert_close(two_weights[name], one_weights[name], rtol=1e-5, atol=1e-6, msg=name)
    assert not list(two_ckpt.parent.glob(".tmp-*"))
    one_run = build(load_config(one_dir / "config.yaml"), resume=one_dir)
    two_run = build(load_config(two_dir / "config.yaml"), resume=two_dir)
    assert two_run.step == one_run.step == 1
    for p1, p2 in zip(one_run.student.parameters(), two_run.student.parameters()):
        s1, s2 = one_run.optimizer.state[p1], two_run.optimizer.state[p2]
        torch.testing.assert_close(s2["exp_avg"], s1["exp_avg"], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(s2["exp_avg_sq"], s1["exp_avg_sq"], rtol=1e-4, atol=1e-10)


def _train_worker(rank: int, world: int, port: int, recipe: str, overrides: list[str], error_dir: Path) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).parent))  # kdrl_test_rewards
    from kdrl.distributed import close_distributed
    from kdrl.trainer import train

    try:
        train(load_config(recipe, overrides))
    except BaseException as error:  # reported to the parent
        torch.save(repr(error), error_dir / f"error-{rank}.pt")
        raise
    finally:
        close_distributed()


@pytest.mark.parametrize("recipe", ["grpo", "ghpo", "ampo"])
def test_two_processes_train_every_recipe_with_failed_groups_on_one_rank(tiny_overrides, tmp_path, recipe):
    """Only rank 1 has all-failed groups (kdrl_test_rewards.rank_zero_solves_all): ghpo's hinted
    generate and ampo's scoring of teacher rows are FSDP collectives, so both ranks must make them
    (before, rank 0 went on to the next all-reduce and the two processes waited forever)."""
    overrides = [o for o in tiny_overrides if not o.startswith(("log.run_dir", "train.steps", "rollout."))] + [
        f"log.run_dir={tmp_path / 'run'}", "train.steps=2", f"rollout.prompts_per_step={PROMPTS}",
        "rollout.group_size=4", "rollout.max_new_tokens=12", "train.device=cpu", "eval.num_problems=2",
        "reward.functions=[kdrl_test_rewards:rank_zero_solves_all]", "checkpoint.save_final=false"]
    context = mp.get_context("spawn")
    port = _free_port()
    recipe_path = str(Path(__file__).parent.parent / "recipes" / f"{recipe}.yaml")
    workers = [context.Process(target=_train_worker, args=(rank, 2, port, recipe_path, overrides, tmp_path))
               for rank in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=240)
    hung = [worker for worker in workers if worker.is_alive()]
    for worker in hung:
        worker.kill()
    errors = [torch.load(f, weights_only=False) for f in sorted(tmp_path.glob("error-*.pt"))]
    assert not hung, f"{recipe}: the two processes waited on different collectives"
    assert not errors and all(worker.exitcode == 0 for worker in workers), (errors, [w.exitcode for w in workers])
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps if m.get("kind", "train") == "train"][-1] == 2


def test_uneven_prompt_split_is_an_error():
    from kdrl.distributed import Distributed

    assert Distributed(rank=1, world_size=2).share(4) == slice(2, 4)
    with pytest.raises(ValueError, match="split evenly"):
        Distributed(rank=0, world_size=3).share(4)


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parent.parent / "recipes" / "paper").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_paper_recipes_are_valid_and_memory_sane(recipe):
    config = load_config(recipe)
    assert config.model.dtype == "bfloat16" and config.model.gradient_checkpointing
    assert config.rollout.max_new_tokens == 8192 and config.train.micro_batch_size <= 2
    assert config.rollout.prompts_per_step % 8 == 0  # splits over 8 processes
    assert config.objective.chunk_size <= 256
