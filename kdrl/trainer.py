"""The training loop: sample, reward, teach, prepare, update. Nothing else lives here.

One step, top to bottom (DESIGN.md, "Data flow of one training step"):

    problems  = next prompts from the data order
    rollouts  = engine.generate(problems, G, sampling)          # student (or teacher for SFT)
    rewards   = verifier(problem, response) per row
    teacher   = teacher.score(rollouts)                         # log-probs (+ hidden states for full-vocab KD)
    batch     = objective.prepare(batch, step)                  # advantages, KD masks, beta(step), weights
    update    = micro-batched forward/backward of objective.loss; clip; AdamW step
"""
from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import torch

from kdrl import checkpoint as ckpt
from kdrl.batching import micro_batches
from kdrl.config import Config, ConfigError, save_config
from kdrl.data import DataError, PromptSampler, format_prompt, load_problems
from kdrl.distributed import (Distributed, QuietLogger, full_model_state, full_optimizer_state, grad_norm_value,
                              init_distributed, load_optimizer_state, reduce_metrics, shard_model)
from kdrl.evaluate import evaluate_problems
from kdrl.logger import MetricsLogger, plot_run
from kdrl.methods import attach, load_method_inputs
from kdrl.models import (ModelError, check_tokenizers_compatible, context_length, load_model, load_tokenizer,
                         logit_scale, output_projection, response_hidden_states)
from kdrl.objective import Objective
from kdrl.onpolicy import (ON_POLICY_SOURCES, SELF, DatasetResponses, RolloutSource, SelfTeacher, needs_reference_model,
                           needs_teacher_model, solution_users)
from kdrl.rewards import combine_rewards
from kdrl.rollout import SamplingParams, make_engine
from kdrl.teachers import LocalTeacher
from kdrl.types import Problem, Rollouts, StudentOutput, TrainBatch


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite losses); the last good checkpoint is kept."""


# ----------------------------------------------------------------------------- setup

@dataclass
class Run:
    config: Config
    run_dir: Path
    device: torch.device
    tokenizer: Any
    student: torch.nn.Module
    teacher: Optional[torch.nn.Module]
    reference: Optional[torch.nn.Module]
    train_problems: list[Problem]
    eval_sets: dict[str, list[Problem]]
    reward_fn: Any
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    prompt_order: PromptSampler
    logger: MetricsLogger
    step: int = 0
    nonfinite_streak: int = 0
    student_engine: Any = None  # generates with the student (evaluation, on-policy rollouts)
    sampling_engine: Any = None  # generates the training rollouts (the teacher for SFT on teacher traces)
    teacher_scorer: Optional[LocalTeacher | SelfTeacher] = None
    reference_scorer: Optional[LocalTeacher] = None
    failed_groups: Any = None  # what to do with groups in which every response failed (ghpo, ampo)
    dist: Distributed = field(default_factory=Distributed)  # this process's rank (kdrl.distributed)


def parse_reward_specs(specs: list[str]) -> list[tuple[str, float]]:
    """``"math"`` or ``"format*0.1"`` -> (name, weight)."""
    parsed = []
    for spec in specs:
        name, _, weight = spec.partition("*")
        try:
            parsed.append((name.strip(), float(weight) if weight else 1.0))
        except ValueError:
            raise DataError(f"reward.functions: bad weight in '{spec}' (use name*weight, e.g. format*0.1)") from None
    return parsed


def make_encoder(tokenizer: Any, config: Config, max_tokens: int):
    cache: dict[tuple[str, str], list[int]] = {}

    def encode(problem: Problem, suffix: str = "") -> list[int]:
        key = (problem.prompt, suffix)
        if key not in cache:
            text = format_prompt(problem, tokenizer, config.data.chat_template, config.data.prompt_template,
                                 config.data.system_prompt, extra=suffix)
            ids = tokenizer(text, add_special_tokens=not config.data.chat_template)["input_ids"]
            if len(ids) > max_tokens:
                raise DataError(f"problem '{problem.id}': prompt has {len(ids)} tokens, more than the "
                                f"{max_tokens} allowed (data.max_prompt_tokens, and the model's context "
                                f"minus rollout.max_new_tokens)")
            cache[key] = ids
        return cache[key]

    return encode


def default_run_dir(config: Config) -> Path:
    return Path("runs") / f"{config.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def lr_lambda(config: Config):
    train = config.train

    def factor(step: int) -> float:
        if train.warmup_steps and step < train.warmup_steps:
            return (step + 1) / train.warmup_steps
        progress = (step - train.warmup_steps) / max(1, train.steps - train.warmup_steps)
        if train.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if train.lr_schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


def setup(config: Config, resume: Optional[str | Path] = None) -> Run:
    info, device = init_distributed(config.train.device)  # torchrun: one process per device
    if config.rollout.prompts_per_step % info.world_size:
        raise ConfigError(f"rollout.prompts_per_step={config.rollout.prompts_per_step} must be a multiple of the "
                          f"{info.world_size} processes (it is the global batch, split evenly)")
    seed_everything(config.train.seed + info.rank)
    resume_from, state = None, None
    if resume is not None:
        run_dir = Path(resume)
        resume_from = ckpt.latest_checkpoint(run_dir)
        if resume_from is None:
            raise ckpt.CheckpointError(f"{run_dir}: no complete checkpoint to resume from")
        state = ckpt.load_trainer_state(resume_from)
    else:
        run_dir = Path(info.broadcast_object(str(config.log.run_dir or default_run_dir(config))))

    # Everything a user can get wrong is checked before the run directory is written.
    tokenizer = load_tokenizer(config.model.student, config.model.trust_remote_code)
    train_problems = load_problems(config.data.train, config.data.prompt_field, config.data.answer_field,
                                   config.data.solution_field, require_solution=", ".join(solution_users(config)))
    eval_sets, eval_sources = {}, {}
    for spec in config.data.eval:
        name = Path(spec.split(":")[-1]).stem
        if name in eval_sets:
            raise ConfigError(f"data.eval: '{eval_sources[name]}' and '{spec}' would both report as '{name}'; "
                              "rename one file")
        eval_sources[name] = spec
        eval_sets[name] = load_problems(spec, config.data.prompt_field, config.data.answer_field,
                                        config.data.solution_field, limit=config.eval.num_problems)
    try:
        reward_fn = combine_rewards(parse_reward_specs(config.reward.functions), config.reward.timeout_s)
    except (ValueError, TypeError) as error:  # unknown name, unimportable module:function
        raise ConfigError(f"reward.functions: {error}") from None

    # A LoRA student resumes as the base plus its saved adapter (and optimizer state for it);
    # a full student resumes from the checkpoint's weights.
    lora_resume = resume_from is not None and config.model.lora.enabled
    if lora_resume and not (resume_from / "adapter").is_dir():
        raise ckpt.CheckpointError(f"{resume_from}: no LoRA adapter saved, but model.lora.enabled=true")
    student = load_model(str(resume_from) if resume_from and not lora_resume else config.model.student,
                         config.model, device, trainable=True,
                         adapter=resume_from / "adapter" if lora_resume else None)
    set_cpu_threads(config.train.cpu_threads, device, student)
    student = shard_model(student, info)  # FSDP2 over the processes (no-op on one)
    teacher = None
    if needs_teacher_model(config):
        teacher = load_model(config.model.teacher, config.model, device, trainable=False)
        check_tokenizers_compatible(tokenizer, load_tokenizer(config.model.teacher, config.model.trust_remote_code),
                                    "teacher", student, teacher)
    reference = None
    if needs_reference_model(config):
        if config.model.reference == "student":
            reference = load_model(config.model.student, config.model, device, trainable=False)
        else:
            reference = load_model(config.model.reference, config.model, device, trainable=False)
            check_tokenizers_compatible(tokenizer, load_tokenizer(config.model.reference,
                                                                  config.model.trust_remote_code), "reference",
                                        student, reference)

    context = context_length(student)
    max_prompt = config.data.max_prompt_tokens
    if context is not None:
        max_prompt = min(max_prompt, context - config.rollout.max_new_tokens)
        if max_prompt < 1:
            raise ModelError(f"rollout.max_new_tokens={config.rollout.max_new_tokens} leaves no room for a prompt "
                             f"in the student's context of {context} tokens")
    encode = make_encoder(tokenizer, config, max_prompt)
    sources = [(config.data.train, train_problems)] + [(eval_sources[name], eval_sets[name]) for name in eval_sets]
    for spec, problems in sources:
        for problem in problems:
            try:
                encode(problem)  # fail now, naming the file and the problem, rather than mid-run
            except DataError as error:
                raise DataError(f"{spec}: {error}") from None

    objective = Objective(config.objective, total_steps=config.train.steps,
                          max_response_len=config.rollout.max_new_tokens,
                          correct_threshold=config.reward.correct_threshold,
                          temperature=config.rollout.temperature, all_reduce_sum=info.all_reduce_sum)
    methods = load_method_inputs(config, train_problems, tokenizer, student, device, objective)  # METHODS.md §6
    train_problems = methods.train_problems  # the cached prompts when training from a teacher cache
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.train.learning_rate, weight_decay=config.train.weight_decay,
                                  betas=(config.train.adam_beta1, config.train.adam_beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    prompt_order = PromptSampler(len(train_problems), config.train.seed, config.data.shuffle)

    step, streak = 0, 0
    if state is not None:
        try:
            load_optimizer_state(student, optimizer, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        except (ValueError, KeyError) as error:  # e.g. LoRA switched on or off since the checkpoint
            raise ckpt.CheckpointError(f"{resume_from}: the optimizer state does not fit this model ({error})") \
                from None
        saved_count = int(state["prompt_order"].get("num_problems", len(train_problems)))
        if saved_count != len(train_problems):
            raise ckpt.CheckpointError(f"{resume_from}: the run was trained on {saved_count} problems, but "
                                       f"data.train={config.data.train} has {len(train_problems)}; the data order "
                                       "cannot be resumed")
        prompt_order.load_state_dict(state["prompt_order"])
        step, streak = int(state["step"]), int(state.get("nonfinite_streak", 0))

    if info.is_main:  # everything is checked: now the run directory is written, once
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
        if state is not None:
            truncate_metrics(run_dir, step)
    info.barrier()
    logger = MetricsLogger(run_dir, config.log, config.train.steps, initial_step=step) if info.is_main \
        else QuietLogger()
    run = Run(config, run_dir, device, tokenizer, student, teacher, reference, train_problems, eval_sets, reward_fn,
              objective, optimizer, scheduler, prompt_order, logger, step=step, nonfinite_streak=streak, dist=info)
    run.student_engine = make_engine(config.rollout.engine, model=student, tokenizer=tokenizer, encode=encode,
                                     generation_batch_size=config.rollout.generation_batch_size)
    run.sampling_engine = make_rollout_source(config, run, teacher, encode)
    run.teacher_scorer = LocalTeacher(teacher, config.train.micro_batch_size, config.objective.chunk_size,
                                      config.rollout.temperature) \
        if teacher is not None else None
    if config.model.teacher == SELF:
        run.teacher_scorer = make_self_teacher(config, run, encode)
    run.reference_scorer = LocalTeacher(reference, config.train.micro_batch_size, config.objective.chunk_size,
                                        config.rollout.temperature) \
        if reference is not None else None
    if state is not None and isinstance(run.teacher_scorer, SelfTeacher):
        run.teacher_scorer.load_state_dict(state.get("self_teacher", {}))
    attach(run, methods)  # teacher cache replay, routed teachers, failed-group action
    if state is not None:
        ckpt.set_rng_state(state["rng"])  # last: the generators continue exactly from the checkpoint moment
        if info.rank > 0:  # rank 0's state was saved; the others get their own stream from it
            seed_everything(config.train.seed + info.rank + 1_000_003 * step)
    return run


def make_rollout_source(config: Config, run: Run, teacher: Optional[torch.nn.Module], encode) -> RolloutSource:
    """The engines ``rollout.policy`` can pick from at each step (the student's is always there)."""
    rollout = config.rollout
    engines: dict[str, Any] = {"student": run.student_engine}
    mixed = rollout.policy == "mixed"
    if teacher is not None and (rollout.policy == "teacher" or (mixed and rollout.off_policy_source == "teacher")):
        engines["teacher"] = make_engine(rollout.engine, model=teacher, tokenizer=run.tokenizer, encode=encode,
                                         generation_batch_size=rollout.generation_batch_size)
    if rollout.policy == "dataset" or (mixed and rollout.off_policy_source == "dataset"):
        engines["dataset"] = DatasetResponses(run.student, run.tokenizer, encode, config.train.micro_batch_size,
                                              config.objective.chunk_size, rollout.temperature)
    return RolloutSource(rollout.policy, engines, config.train.seed, rollout.on_policy_fraction,
                         rollout.off_policy_source)


def make_self_teacher(config: Config, run: Run, encode) -> SelfTeacher:
    """OPSD's teacher (model.teacher=self); every training problem's privileged prompt is checked now."""
    initial = load_model(config.model.student, config.model, run.device, trainable=False) \
        if config.self_teacher.mode == "frozen" else None
    teacher = SelfTeacher(config.self_teacher, run.student, initial, encode, run.tokenizer.pad_token_id,
                          config.train.micro_batch_size, config.objective.chunk_size, config.rollout.temperature)
    teacher.check(run.train_problems, config.data.train)
    return teacher


def set_cpu_threads(threads: int, device: torch.device, student: torch.nn.Module) -> None:
    from kdrl.cpu_threads import apply_cpu_threads  # 0 = measured at start-up (kdrl.cpu_threads)

    apply_cpu_threads(threads, device, student)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint so the log reads as one run.

    A line cut short by a kill mid-write is dropped too.
    """
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = run_dir / name
        if not path.is_file():
            continue
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text("".join(line + "\n" for line in kept))
        os.replace(temporary, path)


# ----------------------------------------------------------------------------- one step

@contextmanager
def timed(timings: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    timings[f"time_{name}"] = timings.get(f"time_{name}", 0.0) + time.perf_counter() - start


def score_rewards(run: Run, rollouts: Rollouts) -> torch.Tensor:
    problems = [rollouts.problems[row // rollouts.group_size] for row in range(rollouts.num_rows)]
    return torch.tensor([float(run.reward_fn(p, text)) for p, text in zip(problems, rollouts.response_texts)])


def make_batch(run: Run, rollouts: Rollouts, rewards: torch.Tensor, teacher_out, reference_out) -> TrainBatch:
    return TrainBatch(
        input_ids=rollouts.input_ids(), attention_mask=rollouts.attention_mask(),
        prompt_width=rollouts.prompt_ids.shape[1], response_ids=rollouts.response_ids,
        response_mask=rollouts.response_mask, sampler_logprobs=rollouts.sampler_logprobs, rewards=rewards,
        group_size=rollouts.group_size,
        teacher_logprobs=teacher_out.token_logprobs if teacher_out is not None else None,
        teacher_hidden=teacher_out.hidden_states if teacher_out is not None else None,
        teacher_output_weight=teacher_out.output_weight if teacher_out is not None else None,
        reference_logprobs=reference_out.token_logprobs if reference_out is not None else None,
        kd_coef=teacher_out.kd_coef if teacher_out is not None else None,
        on_policy=torch.tensor([float(source in ON_POLICY_SOURCES) for source in rollouts.sources]),
        sampler_entropy=rollouts.sampler_entropy)


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
        scale = batch.num_rows / len(minibatch_rows)  # a minibatch carries the full batch's loss scale
        run.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        loss_finite = True
        for micro in micro_batches(batch, minibatch_rows, train.micro_batch_size):  # by length (kdrl.batching)
            micro = micro.to(run.device)
            loss, micro_metrics = run.objective.loss(micro, student_forward(run, micro), off_policy=update_index > 0)
            loss_finite = loss_finite and math.isfinite(float(loss.detach()))
            (loss * scale).backward()
            for key, value in micro_metrics.items():
                metrics[key] = metrics.get(key, 0.0) + float(value) * scale
        trainable = [p for p in run.student.parameters() if p.requires_grad]
        grad_norm = grad_norm_value(torch.nn.utils.clip_grad_norm_(trainable, train.max_grad_norm))
        metrics["grad_norm"] = grad_norm
        if not loss_finite or not math.isfinite(metrics.get("loss", 0.0)) or not math.isfinite(grad_norm):
            run.optimizer.zero_grad(set_to_none=True)
            metrics["skipped"] = 1.0
            metrics["nonfinite_term"] = nonfinite_term(metrics)
        else:
            run.optimizer.step()
            metrics["skipped"] = 0.0
        for key, value in metrics.items():  # report the last update's values
            totals[key] = value
    with warnings.catch_warnings():  # a skipped first step is deliberate, not torch's call-order mistake
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        run.scheduler.step()
    return totals


def nonfinite_term(metrics: dict[str, Any]) -> str:
    for term in ("pg_loss", "kd_loss", "ref_kl", "nll", "entropy", "loss"):
        value = metrics.get(term)
        if isinstance(value, float) and not math.isfinite(value):
            return term
    return "gradient"


def training_step(run: Run) -> dict[str, Any]:
    config, timings = run.config, {}
    sampling = SamplingParams(config.rollout.temperature, config.rollout.top_p, config.rollout.max_new_tokens)
    order = run.prompt_order.next(config.rollout.prompts_per_step)  # the global batch; this rank's share:
    problems = [run.train_problems[i] for i in order[run.dist.share(len(order))]]
    with timed(timings, "generate"):
        rollouts = run.sampling_engine.generate(problems, config.rollout.group_size, sampling, step=run.step)
    with timed(timings, "reward"):
        rewards = score_rewards(run, rollouts)
    with timed(timings, "failed_groups"):  # ghpo hints / ampo teacher solutions where a whole group failed
        rollouts, rewards, rescue_metrics = run.failed_groups(rollouts, rewards, sampling)
    with timed(timings, "teacher"):
        teacher_out = run.teacher_scorer.score(rollouts, need_hidden=run.objective.needs_teacher_hidden) \
            if run.objective.needs_teacher else None
        reference_out = run.reference_scorer.score(rollouts) if run.reference_scorer is not None else None
    batch = run.objective.prepare(make_batch(run, rollouts, rewards, teacher_out, reference_out), run.step)
    with timed(timings, "train"):
        update_metrics = update(run, batch)
        if run.teacher_scorer is not None:
            run.teacher_scorer.after_update()  # an EMA self-teacher follows the student
    run.step += 1
    metrics = {**step_metrics(run, rollouts, rewards, batch), **rescue_metrics, **update_metrics, **timings,
               "tokens_per_second": float(rollouts.response_mask.sum()) / max(1e-9, sum(timings.values()))}
    return {**reduce_metrics(metrics, run.dist), "_rollouts": rollouts, "_rewards": rewards}


def step_metrics(run: Run, rollouts: Rollouts, rewards: torch.Tensor, batch: TrainBatch) -> dict[str, float]:
    lengths = rollouts.response_mask.sum(-1)
    correct = (rewards >= run.config.reward.correct_threshold).float()
    return {"reward": float(rewards.mean()), "accuracy": float(correct.mean()),
            "response_length": float(lengths.mean()), "truncated_fraction": float(rollouts.truncated.float().mean()),
            "lr": run.scheduler.get_last_lr()[0], **run.objective.prepare_metrics(batch)}


# ----------------------------------------------------------------------------- the loop

def evaluate_student(run: Run) -> dict[str, float]:
    config = run.config
    results = {}
    for name, problems in run.eval_sets.items():
        metrics = evaluate_problems(run.student_engine, problems, run.reward_fn, samples=config.eval.samples,
                                    temperature=config.eval.temperature, top_p=config.rollout.top_p,
                                    max_new_tokens=config.eval.max_new_tokens or config.rollout.max_new_tokens,
                                    correct_threshold=config.reward.correct_threshold,
                                    batch_size=config.eval.batch_size)
        results.update({f"{name}/{key}": value for key, value in metrics.items()})
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
                 "rng": rng}
        if isinstance(run.teacher_scorer, SelfTeacher):
            state["self_teacher"] = run.teacher_scorer.state_dict()
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


def train(config: Config, resume: Optional[str | Path] = None) -> dict[str, Any]:
    run = setup(config, resume)
    logger = run.logger
    logger.write(f"kdrl: run directory {run.run_dir}")
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
                logger.samples(run.step, [{"prompt": rollouts.problems[i // rollouts.group_size].prompt,
                                           "response": rollouts.response_texts[i], "reward": float(rewards[i])}
                                          for i in range(min(4, rollouts.num_rows))])
            if config.eval.every and run.step % config.eval.every == 0 and run.step < config.train.steps:
                logger.log(run.step, evaluate_student(run), kind="eval")
            if config.checkpoint.every and run.step % config.checkpoint.every == 0:
                save(run)
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
    wall = time.perf_counter() - started
    after = evaluate_student(run) if config.data.eval else {}
    if after and run.dist.is_main:
        _append_eval(run, after)
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


def _append_eval(run: Run, metrics: dict[str, float]) -> None:
    with (run.run_dir / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"step": run.step, "kind": "eval", **metrics}) + "\n")


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


def summary_table(before: Optional[dict], after: dict, wall: float, steps: int) -> str:
    sets = sorted({key.split("/")[0] for key in after if key.endswith("/accuracy")})
    lines = [f"\nkdrl: {steps} steps in {wall:.0f} s", "", "| set | accuracy before | accuracy after | "
             "length before | length after |", "|---|---|---|---|---|"]
    for name in sets:
        b = before or {}
        lines.append(f"| {name} | {_pct(b.get(f'{name}/accuracy'))} | {_pct(after.get(f'{name}/accuracy'))} | "
                     f"{_num(b.get(f'{name}/response_length'))} | {_num(after.get(f'{name}/response_length'))} |")
    return "\n".join(lines)


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.1f}"
