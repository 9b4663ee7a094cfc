"""The training loop: sample, reward, teach, prepare, update. Nothing else lives here.

One step, top to bottom (DESIGN.md, "Data flow of one training step"):

    problems  = next prompts from the data order
    rollouts  = source.generate(problems, G, sampling, step)    # student, teacher, dataset or cache
    rewards   = verifier(problem, response) per row
    teacher   = teacher.score(rollouts)                         # log-probs (+ hidden states) if this step reads them
    batch     = objective.prepare(batch, step)                  # advantages, KD masks, beta(step), weights
    update    = micro-batched forward/backward of objective.loss; clip; AdamW step

Who samples, who teaches and what is loaded is decided once, by ``kdrl.build.build``.
"""
from __future__ import annotations

import json
import math
import time
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Optional

import torch

from kdrl import checkpoint as ckpt
from kdrl.batching import micro_batches
from kdrl.build import Run, build
from kdrl.config import Config
from kdrl.cpu_threads import current_policy
from kdrl.distributed import (MaxOverRanks, SumOverRanks, full_model_state, full_optimizer_state, grad_norm_value,
                              reduce_metrics)
from kdrl.evaluate import EVAL_PROBLEMS_FILE, evaluate_problems, summary_table
from kdrl.logger import plot_run
from kdrl.models import logit_scale, output_projection, response_hidden_states
from kdrl.rewards import reward_stats
from kdrl.rollout import SamplingParams
from kdrl.rollout.rows import score_rewards
from kdrl.rollout.sources import ON_POLICY_SOURCES
from kdrl.types import Rollouts, StudentOutput, TrainBatch


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite losses); the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- one step

@contextmanager
def timed(timings: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    timings[f"time_{name}"] = MaxOverRanks(timings.get(f"time_{name}", 0.0) + time.perf_counter() - start)


def make_batch(rollouts: Rollouts, rewards: torch.Tensor, teacher_out, reference_out) -> TrainBatch:
    return TrainBatch(
        input_ids=rollouts.input_ids(), attention_mask=rollouts.attention_mask(),
        prompt_width=rollouts.prompt_ids.shape[1], response_ids=rollouts.response_ids,
        response_mask=rollouts.response_mask, sampler_logprobs=rollouts.sampler_logprobs, rewards=rewards,
        group_size=rollouts.group_size,
        teacher_logprobs=teacher_out.token_logprobs if teacher_out is not None else None,
        teacher_hidden=teacher_out.hidden_states if teacher_out is not None else None,
        teacher_output_weight=teacher_out.output_weight if teacher_out is not None else None,
        teacher_output_bias=teacher_out.output_bias if teacher_out is not None else None,
        reference_logprobs=reference_out.token_logprobs if reference_out is not None else None,
        on_policy=torch.tensor([float(source in ON_POLICY_SOURCES) for source in rollouts.sources]),
        sampler_entropy=rollouts.sampler_entropy, problems=rollouts.problems)


def student_forward(run: Run, batch: TrainBatch) -> StudentOutput:
    """Hidden states at response positions; the logits are formed chunk by chunk in the loss.

    The objective divides by the sampling temperature, so the trained policy is the one that
    sampled (as TRL and verl do).
    """
    device = run.device
    hidden = response_hidden_states(run.student, batch.input_ids.to(device), batch.attention_mask.to(device),
                                    batch.prompt_width)
    weight, bias = output_projection(run.student)
    factor = logit_scale(run.student)
    return StudentOutput(hidden_states=hidden * factor, output_weight=weight,
                         output_bias=bias * factor if bias is not None else None)


def update(run: Run, batch: TrainBatch) -> dict[str, float]:
    """``updates_per_batch`` optimizer steps over the batch, each accumulated over micro-batches."""
    train = run.config.train
    rows = torch.arange(batch.num_rows)
    minibatches = rows.chunk(train.updates_per_batch)
    totals: dict[str, float] = {}
    for update_index, minibatch_rows in enumerate(minibatches):
        # each minibatch normalised on its own (token_mean: by its own token count), so every
        # optimizer step has the step size of a full batch whatever its responses' lengths
        minibatch = run.objective.minibatch(batch, minibatch_rows) if len(minibatches) > 1 else batch
        run.optimizer.zero_grad(set_to_none=True)
        metrics, loss_finite = accumulate_gradients(run, minibatch, off_policy=update_index > 0)
        trainable = [p for p in run.student.parameters() if p.requires_grad]
        grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(trainable, train.max_grad_norm))
        metrics["grad_norm"] = grad_norm
        # skip together: a non-finite loss on any rank skips the step on every rank (the others would
        # otherwise step while it does not, and the replicas' optimizer states part ways)
        finite_here = loss_finite and math.isfinite(metrics.get("loss", 0.0)) and math.isfinite(grad_norm)
        if run.dist.any_rank(not finite_here):
            run.optimizer.zero_grad(set_to_none=True)
            metrics["skipped"] = 1.0
            metrics["nonfinite_term"] = nonfinite_term(metrics)
        else:
            run.optimizer.step()
            run.student_engine.sync_weights(run.student)  # an engine with its own weights (vLLM) follows
            metrics["skipped"] = 0.0
        run.objective.after_update(reduce_metrics(metrics, run.dist))  # every rank hears the same global numbers
        for key, value in metrics.items():  # report the last update's values
            totals[key] = value
    with warnings.catch_warnings():  # a skipped first step is deliberate, not torch's call-order mistake
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        run.scheduler.step()
    return totals


def accumulate_gradients(run: Run, batch: TrainBatch, off_policy: bool = False) -> tuple[dict[str, float], bool]:
    """The batch's loss gradient added into the student's ``.grad``, one micro-batch at a time; returns
    the summed metrics (each micro-batch's share of the batch's weighted mean) and whether every
    micro-batch's loss was finite."""
    metrics: dict[str, float] = {}
    loss_finite = True
    # rows of similar length together, each micro-batch cut to its longest response (kdrl.batching)
    for micro in micro_batches(batch, torch.arange(batch.num_rows), run.config.train.micro_batch_size):
        micro = micro.to(run.device)
        loss, micro_metrics = run.objective.loss(micro, student_forward(run, micro), off_policy=off_policy)
        loss_finite = loss_finite and math.isfinite(float(loss.detach()))
        loss.backward()
        for key, value in micro_metrics.items():
            metrics[key] = SumOverRanks(metrics.get(key, 0.0) + float(value))
    return metrics, loss_finite


def nonfinite_term(metrics: dict[str, Any]) -> str:
    for term in ("pg_loss", "kd_loss", "ref_kl", "nll", "entropy", "loss"):
        value = metrics.get(term)
        if isinstance(value, float) and not math.isfinite(value):
            return term
    return "gradient"


def training_step(run: Run) -> dict[str, Any]:
    timings: dict[str, float] = {}
    rollouts, rewards, batch, rescue_metrics = collect_batch(run, timings)
    with timed(timings, "train"):
        update_metrics = update(run, batch)
        if run.teacher_scorer is not None:
            run.teacher_scorer.after_update()  # an EMA self-teacher follows the student
    run.step += 1
    tokens_per_second = SumOverRanks(float(rollouts.response_mask.sum()) / max(1e-9, sum(timings.values())))
    metrics = {**step_metrics(run, rollouts, rewards, batch), **rescue_metrics, **update_metrics, **timings,
               "tokens_per_second": tokens_per_second}  # this rank's tokens over its own time: summed
    reduced = {key: value for key, value in reduce_metrics(metrics, run.dist).items()
               if key not in REWARD_COUNTS or value}  # a count shows in the step's line when it is not 0
    return {**reduced, "_rollouts": rollouts, "_rewards": rewards}


def collect_batch(run: Run, timings: dict[str, float]) -> tuple[Rollouts, torch.Tensor, TrainBatch, dict[str, Any]]:
    """This step's batch, before any update: sample, reward, rescue all-failed groups, teach, prepare.
    Returns the rollouts, their rewards, the prepared batch and the rescue and reward-count metrics."""
    config = run.config
    sampling = SamplingParams(config.rollout.temperature, config.rollout.top_p, config.rollout.max_new_tokens)
    order = run.prompt_order.next(config.rollout.prompts_per_step)  # the global batch; this rank's share:
    problems = [run.train_problems[i] for i in order[run.dist.share(len(order))]]
    with timed(timings, "generate"):
        rollouts = run.sampling_source.generate(problems, config.rollout.group_size, sampling, step=run.step)
    counted = reward_stats()
    with timed(timings, "reward"):
        rewards = score_rewards(run.reward_fn, rollouts)
    with timed(timings, "failed_groups"):  # ghpo hints / ampo teacher solutions where a whole group failed
        rollouts, rewards, rescue_metrics = run.failed_groups(rollouts, rewards, sampling, run.step)
    rescue_metrics = {**rescue_metrics, **reward_counts(counted)}
    reads = run.objective.inputs_at(run.step)  # a term whose coefficient is 0 this step reads nothing
    with timed(timings, "teacher"):
        teacher_out = run.teacher_scorer.score(rollouts, need_hidden=bool(reads.teacher_hidden)) \
            if reads.teacher_logprobs else None
        reference_out = run.reference_scorer.score(rollouts) if reads.reference_logprobs else None
    batch = run.objective.prepare(make_batch(rollouts, rewards, teacher_out, reference_out), run.step)
    return rollouts, rewards, batch, rescue_metrics


REWARD_COUNTS = ("reward_timeouts", "reward_errors")


def reward_counts(before: dict[str, int]) -> dict[str, Any]:
    """Verifications that hit the time limit (scored 0) and user-reward errors since ``before``,
    summed over ranks: a grade that depends on the machine shows in the metrics (logged when not 0)."""
    now = reward_stats()
    return {"reward_timeouts": SumOverRanks(float(now["timeouts"] - before["timeouts"])),
            "reward_errors": SumOverRanks(float(now["errors"] + now["user_errors"]
                                                - before["errors"] - before["user_errors"]))}


def step_metrics(run: Run, rollouts: Rollouts, rewards: torch.Tensor, batch: TrainBatch) -> dict[str, float]:
    lengths = rollouts.response_mask.sum(-1)
    correct = (rewards >= run.config.reward.correct_threshold).float()
    return {"reward": float(rewards.mean()), "accuracy": float(correct.mean()),
            "response_length": float(lengths.mean()), "truncated_fraction": float(rollouts.truncated.float().mean()),
            "lr": run.scheduler.get_last_lr()[0], **run.objective.prepare_metrics(batch),
            **getattr(run.student_engine, "metrics", {})}  # e.g. vllm's pi_old_recomputed


# ----------------------------------------------------------------------------- the loop

def evaluate_student(run: Run, details: Optional[dict[str, list]] = None) -> dict[str, float]:
    """Metrics per eval set; ``details`` (if given) receives each set's per-problem records."""
    config = run.config
    results = {}
    counted = reward_stats()
    for name, problems in run.eval_sets.items():
        metrics = evaluate_problems(run.student_engine, problems, run.reward_fn, samples=config.eval.samples,
                                    temperature=config.eval.temperature, top_p=config.rollout.top_p,
                                    max_new_tokens=config.eval.max_new_tokens or config.rollout.max_new_tokens,
                                    correct_threshold=config.reward.correct_threshold,
                                    batch_size=config.eval.batch_size,
                                    details=None if details is None else details.setdefault(name, []))
        results.update({f"{name}/{key}": value for key, value in metrics.items()})
    timeouts = float(run.dist.all_reduce_sum(torch.tensor(float(reward_counts(counted)["reward_timeouts"]))))
    if timeouts:
        results["reward_timeouts"] = timeouts
    return results


def save(run: Run) -> Path:
    """Checkpoint the current state (atomically); ``final`` points at it."""
    rng = ckpt.rng_state()  # the generators as they are now, before saving touches anything
    latest = ckpt.latest_checkpoint(run.run_dir)
    if latest is not None and latest.name == ckpt.step_name(run.step):
        path = latest  # already saved at this step (the final save after a periodic one): same weights
    else:
        bad = [name for name, p in run.student.named_parameters() if not bool(torch.isfinite(_local(p)).all())]
        if run.dist.all_reduce_sum(torch.tensor(float(len(bad)))) > 0:  # never replace a good checkpoint
            raise TrainingStopped(f"step {run.step}: non-finite weights ({bad[0] if bad else 'on another rank'}); "
                                  f"not saved. The last good checkpoint in {run.run_dir} is kept")
        # Several processes: full weights and optimizer state are gathered on every rank, written by rank 0.
        weights, optimizer_state = full_model_state(run.student), full_optimizer_state(run.student, run.optimizer)
        state = {"optimizer": optimizer_state, "scheduler": run.scheduler.state_dict(),
                 "prompt_order": run.prompt_order.state_dict(), "nonfinite_streak": run.nonfinite_streak,
                 "rng": rng, "objective": run.objective.state_dict(),
                 "teacher": run.teacher_scorer.state_dict() if run.teacher_scorer is not None else {}}
        path = ckpt.checkpoint_dir(run.run_dir) / ckpt.step_name(run.step)
        if run.dist.is_main:
            path = ckpt.save_checkpoint(run.run_dir, run.step, run.student, run.tokenizer, state,
                                        run.config.checkpoint.keep_last, state_dict=weights)
    if run.dist.is_main:
        ckpt.link_final(run.run_dir, path)
    run.dist.barrier()
    return path


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor  # this rank's shard of a DTensor


def train(config: Config, resume: Optional[str | Path] = None, overwrite: bool = False) -> dict[str, Any]:
    """``overwrite``: clear a ``log.run_dir`` that holds another run first (otherwise it is refused)."""
    run = build(config, resume, overwrite)
    logger = run.logger
    logger.write(f"kdrl: run directory {run.run_dir}")
    if run.device.type == "cpu" and current_policy() is not None:
        logger.write(f"kdrl: {current_policy().describe()}")
    before = None
    if run.step == 0 and config.eval.before and config.data.eval:
        before = evaluate_student(run)
        logger.log(0, before, kind="eval")
        if run.dist.is_main:
            (run.run_dir / "eval_before.json").write_text(json.dumps(before, indent=2))
    elif run.step > 0 and (run.run_dir / "eval_before.json").is_file():  # resumed: evaluated once, read back
        before = json.loads((run.run_dir / "eval_before.json").read_text())
    started = time.perf_counter()
    try:
        while run.step < config.train.steps:
            metrics = training_step(run)
            rollouts, rewards = metrics.pop("_rollouts"), metrics.pop("_rewards")
            logger.log(run.step, metrics)
            logger.advance(metrics)
            check_nonfinite(run, metrics)
            if config.log.sample_every and run.step % config.log.sample_every == 0:
                logger.samples(run.step, [{"prompt": problem.prompt, "response": text, "reward": float(reward)}
                                          for problem, text, reward in zip(rollouts.row_problems()[:4],
                                                                           rollouts.response_texts, rewards)])
            if config.eval.every and run.step % config.eval.every == 0 and run.step < config.train.steps:
                logger.log(run.step, evaluate_student(run), kind="eval")
            if config.checkpoint.every and run.step % config.checkpoint.every == 0:
                save(run)
        wall = time.perf_counter() - started
        after_problems: dict[str, list] = {}  # per problem and sample: kept for paired comparisons (kdrl bench)
        after = evaluate_student(run, after_problems) if config.data.eval else {}
        if after:
            logger.log(run.step, after, kind="eval")
            if run.dist.is_main:
                (run.run_dir / EVAL_PROBLEMS_FILE).write_text(json.dumps(after_problems))
    except TrainingStopped:
        # Skipped steps never change the weights, so the current ones are the last good ones;
        # save them if the run has no checkpoint yet (an existing one is never overwritten).
        if ckpt.latest_checkpoint(run.run_dir) is None:
            run.nonfinite_streak = 0  # a resumed run (with a lower learning rate, say) starts afresh
            with suppress(TrainingStopped):  # weights not finite after all: save nothing
                save(run)
        raise
    finally:
        logger.close()
    if config.checkpoint.save_final:
        save(run)
    summary = {"run_dir": str(run.run_dir), "steps": run.step, "train_seconds": wall,
               "before": before, "after": after}
    if run.dist.is_main:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if config.log.plot:
            plot_run(run.run_dir)
        print(summary_table(before, after, wall, run.step), flush=True)
    return summary


def check_nonfinite(run: Run, metrics: dict[str, Any]) -> None:
    if not metrics.get("skipped"):
        run.nonfinite_streak = 0
        return
    run.nonfinite_streak += 1
    run.logger.write(f"kdrl: step {run.step}: non-finite {metrics.get('nonfinite_term')}; optimizer step skipped "
                     f"({run.nonfinite_streak}/{run.config.train.max_nonfinite_skips})")
    if run.nonfinite_streak >= run.config.train.max_nonfinite_skips:
        raise TrainingStopped(f"{run.nonfinite_streak} consecutive non-finite steps (last: "
                              f"{metrics.get('nonfinite_term')} at step {run.step}); stopping. The last good "
                              f"checkpoint in {run.run_dir} is kept; lower train.learning_rate or the KD beta")
