"""Build once, then loop: ``build(config, resume) -> Run`` decides, in one place, which models are
loaded, who writes each batch (the sampling source), who scores it (the teacher and reference
scorers), what happens to groups that all failed, and the objective.

What a configuration needs (which models, which data fields) is read from ``kdrl.config_needs``,
the rules config validation already applied. Everything a user can get wrong is checked before the
run directory is written.
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

import torch

from kdrl import checkpoint as ckpt
from kdrl.config import Config, ConfigError, save_config, to_dict
from kdrl.config_needs import SELF, batch_writers, needs_reference_model, needs_teacher_model, solution_users
from kdrl.data import DataError, PromptSampler, load_problems, make_encoder
from kdrl.distributed import Distributed, init_distributed, load_optimizer_state, shard_model
from kdrl.logger import MetricsLogger, truncate_metrics
from kdrl.models import (ModelError, check_tokenizers_compatible, context_length, load_model, load_tokenizer,
                         seed_everything, set_cpu_threads)
from kdrl.objective import Objective
from kdrl.rewards import combine_rewards, parse_reward_specs
from kdrl.rollout import RolloutEngine, engine_options, make_engine
from kdrl.rollout.failed_groups import FailedGroupAction, load_solution_files, make_failed_group_action
from kdrl.rollout.sources import CachedRollouts, DatasetResponses, RolloutSource
from kdrl.teachers import LocalTeacher, Teacher, make_scorer
from kdrl.teachers.cache import CachedTeacher, TeacherCache, load_teacher_cache
from kdrl.teachers.routed import RoutedTeacher, load_routed_teachers
from kdrl.teachers.self_teacher import SelfTeacher
from kdrl.types import Problem

# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    """Everything the loop reads, built once; only ``step`` and ``nonfinite_streak`` change."""

    config: Config
    run_dir: Path
    device: torch.device
    tokenizer: Any
    student: torch.nn.Module
    train_problems: list[Problem]  # the cached prompts when training from a teacher cache
    eval_sets: dict[str, list[Problem]]
    reward_fn: Any
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    prompt_order: PromptSampler
    logger: MetricsLogger
    student_engine: RolloutEngine  # generates with the student (evaluation, on-policy rollouts)
    sampling_source: RolloutEngine  # writes the training batches (kdrl.rollout.sources)
    teacher_scorer: Optional[Teacher]
    reference_scorer: Optional[Teacher]
    failed_groups: FailedGroupAction  # groups in which every response failed (ghpo, ampo)
    dist: Distributed
    step: int = 0
    nonfinite_streak: int = 0


@dataclass
class Resume:
    """The checkpoint a run continues from (``state``: its trainer state)."""

    path: Path
    state: dict[str, Any]


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


RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "final")  # what marks a run


def holds_a_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() or (run_dir / name).is_symlink() for name in RUN_FILES)


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """A fresh run gets a directory of its own: never one that holds another run (its metrics would
    mix, its checkpoints be pruned, ``final`` point at the old weights) unless ``overwrite`` says to
    clear it; never a file; never one that cannot be created."""
    if (run_dir.exists() or run_dir.is_symlink()) and not run_dir.is_dir():
        raise ConfigError(f"log.run_dir={run_dir}: is a file, not a directory; choose another log.run_dir")
    if run_dir.is_dir() and holds_a_run(run_dir) and not overwrite:
        raise ConfigError(f"log.run_dir={run_dir}: already holds a run; continue it with `kdrl train --resume "
                          f"{run_dir}`, choose a new log.run_dir, or pass --overwrite to clear it first")
    ancestor = run_dir if run_dir.is_dir() else next((p for p in run_dir.parents if p.is_dir()), Path("."))
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"log.run_dir={run_dir}: cannot be written ({ancestor} is read-only for this user)")


def build(config: Config, resume: Optional[str | Path] = None, overwrite: bool = False) -> Run:
    """``overwrite``: a fresh run may clear a ``log.run_dir`` that holds another run (``--overwrite``)."""
    info, device = init_distributed(config.train.device)  # torchrun: one process per device
    if config.rollout.prompts_per_step % info.world_size:
        raise ConfigError(f"rollout.prompts_per_step={config.rollout.prompts_per_step} must be a multiple of the "
                          f"{info.world_size} processes (it is the global batch, split evenly)")
    seed_everything(config.train.seed + info.rank)
    previous = find_checkpoint(resume)
    run_dir = Path(resume) if resume is not None else \
        Path(info.broadcast_object(str(config.log.run_dir or default_run_dir(config))))
    if resume is None:
        check_run_dir(run_dir, overwrite)

    tokenizer = load_tokenizer(config.model.student, config.model.trust_remote_code)
    train_problems = load_problems(config.data.train, config.data.prompt_field, config.data.answer_field,
                                   config.data.solution_field, require_solution=", ".join(solution_users(config)))
    eval_sets, eval_specs = load_eval_sets(config)
    try:
        reward_fn = combine_rewards(parse_reward_specs(config.reward.functions), config.reward.timeout_s)
    except (ValueError, TypeError) as error:  # unknown name, unimportable module:function
        raise ConfigError(f"reward.functions: {error}") from None
    probe = train_problems[0]
    reward_fn(probe, probe.solution or "")  # a user reward that returns no number fails here, before any writing

    student = shard_model(load_student(config, device, previous), info)  # FSDP2 over the processes (no-op on one)
    teacher = load_frozen(config, "teacher", tokenizer, student, device) if needs_teacher_model(config) else None
    reference = load_frozen(config, "reference", tokenizer, student, device) if needs_reference_model(config) \
        else None
    encode = make_encoder(tokenizer, config, max_prompt_tokens(config, student))
    check_prompts(encode, [(config.data.train, train_problems)] +
                  [(eval_specs[name], eval_sets[name]) for name in eval_sets])

    cache = None
    if config.teacher_cache.path is not None:  # Lightning OPD: replay stored responses and teacher scores
        cache = load_teacher_cache(config, train_problems, tokenizer)
        train_problems = cache.problems
    routed = load_routed_teachers(config, tokenizer, student, train_problems, device)
    objective = Objective(config.objective, total_steps=config.train.steps,
                          max_response_len=config.rollout.max_new_tokens,
                          correct_threshold=config.reward.correct_threshold,
                          temperature=config.rollout.temperature, all_reduce_sum=info.all_reduce_sum,
                          kd_coef_of=routed.kd_coef_of if routed is not None else None)
    teacher_scorer = make_teacher_scorer(config, cache, routed, teacher, student, device, encode, tokenizer,
                                         train_problems)
    solution_pools = load_solution_files(config.failed_groups.solution_files, config.data.solution_field)

    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.train.learning_rate, weight_decay=config.train.weight_decay,
                                  betas=(config.train.adam_beta1, config.train.adam_beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    prompt_order = PromptSampler(len(train_problems), config.train.seed, config.data.shuffle)
    step, streak = restore_optimization(config, previous, student, optimizer, scheduler, prompt_order,
                                        len(train_problems))

    if info.is_main:  # everything is checked: now the run directory is written, once
        if previous is None and overwrite and run_dir.is_dir() and holds_a_run(run_dir):
            shutil.rmtree(run_dir)  # --overwrite: the other run is cleared, not mixed with this one
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            save_config(config, run_dir / "config.yaml")
        except OSError:  # a full disk or a read-only directory: leave no empty run directory behind
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        if previous is not None:  # a resumed run at its last step evaluates again: drop that evaluation
            truncate_metrics(run_dir, step, final_step=config.train.steps)
    info.barrier()
    logger = MetricsLogger(run_dir, config.log, config.train.steps, initial_step=step, run_config=to_dict(config),
                           enabled=info.is_main)

    student_engine = engine_for(student, config, tokenizer, encode)
    student_scorer = make_scorer(student, config)  # the student's own log-probs of rows it did not sample
    if cache is not None:
        sampling_source: RolloutEngine = CachedRollouts(cache, student_scorer if cache.recompute_old else None)
    else:
        sampling_source = make_rollout_source(config, student_engine, teacher, tokenizer, encode, student_scorer)
    run = Run(config, run_dir, device, tokenizer, student, train_problems, eval_sets, reward_fn, objective,
              optimizer, scheduler, prompt_order, logger, student_engine=student_engine,
              sampling_source=sampling_source, teacher_scorer=teacher_scorer,
              reference_scorer=make_scorer(reference, config) if reference is not None else None,
              failed_groups=make_failed_group_action(config, student_engine, reward_fn, tokenizer, student_scorer,
                                                     solution_pools, info.any_rank),
              dist=info, step=step, nonfinite_streak=streak)
    if previous is not None:
        restore_state(run, previous)
    student_engine.sync_weights(student)  # an engine with its own copy of the weights starts from these
    return run


# --------------------------------------------------------------------------- pieces of build


def find_checkpoint(resume: Optional[str | Path]) -> Optional[Resume]:
    if resume is None:
        return None
    path = ckpt.latest_checkpoint(Path(resume))
    if path is None:
        raise ckpt.CheckpointError(f"{resume}: no complete checkpoint to resume from")
    return Resume(path, ckpt.load_trainer_state(path))


def load_eval_sets(config: Config) -> tuple[dict[str, list[Problem]], dict[str, str]]:
    """The held-out sets by name (a file's stem) and the spec each was read from."""
    eval_sets, specs = {}, {}
    for spec in config.data.eval:
        name = Path(spec.split(":")[-1]).stem
        if name in eval_sets:
            raise ConfigError(f"data.eval: '{specs[name]}' and '{spec}' would both report as '{name}'; "
                              "rename one file")
        specs[name] = spec
        eval_sets[name] = load_problems(spec, config.data.prompt_field, config.data.answer_field,
                                        config.data.solution_field, limit=config.eval.num_problems)
    return eval_sets, specs


def load_student(config: Config, device: torch.device, previous: Optional[Resume]) -> torch.nn.Module:
    """The trainable student. A LoRA student resumes as the base plus its saved adapter (and optimizer
    state for it); a full student resumes from the checkpoint's weights."""
    lora_resume = previous is not None and config.model.lora.enabled
    if lora_resume and not (previous.path / "adapter").is_dir():
        raise ckpt.CheckpointError(f"{previous.path}: no LoRA adapter saved, but model.lora.enabled=true")
    spec = str(previous.path) if previous is not None and not lora_resume else config.model.student
    student = load_model(spec, config.model, device, trainable=True,
                         adapter=previous.path / "adapter" if lora_resume else None)
    set_cpu_threads(config.train.cpu_threads, device, student)
    return student


def load_frozen(config: Config, role: str, tokenizer: Any, student: torch.nn.Module,
                device: torch.device) -> torch.nn.Module:
    """``model.teacher`` or ``model.reference`` ("student": the initial student), checked against the
    student's tokenizer."""
    spec = getattr(config.model, role)
    if role == "reference" and spec == "student":
        return load_model(config.model.student, config.model, device, trainable=False)
    model = load_model(spec, config.model, device, trainable=False)
    check_tokenizers_compatible(tokenizer, load_tokenizer(spec, config.model.trust_remote_code), role, student, model)
    return model


def max_prompt_tokens(config: Config, student: torch.nn.Module) -> int:
    """``data.max_prompt_tokens``, capped by the student's context minus the generation budget."""
    context = context_length(student)
    if context is None:
        return config.data.max_prompt_tokens
    room = context - config.rollout.max_new_tokens
    if room < 1:
        raise ModelError(f"rollout.max_new_tokens={config.rollout.max_new_tokens} leaves no room for a prompt "
                         f"in the student's context of {context} tokens")
    return min(config.data.max_prompt_tokens, room)


def check_prompts(encode: Any, sources: list[tuple[str, list[Problem]]]) -> None:
    """Every prompt encodes and fits: fail now, naming the file and the problem, rather than mid-run."""
    for spec, problems in sources:
        for problem in problems:
            try:
                encode(problem)
            except DataError as error:
                raise DataError(f"{spec}: {error}") from None


def engine_for(model: torch.nn.Module, config: Config, tokenizer: Any, encode: Any) -> RolloutEngine:
    """The ``rollout.engine`` that samples from ``model`` (the student, or the teacher writing batches)."""
    return make_engine(config.rollout.engine, model=model, tokenizer=tokenizer, encode=encode,
                       generation_batch_size=config.rollout.generation_batch_size,
                       **engine_options(config.rollout.engine, config.rollout.vllm, config.train.seed,
                                        make_scorer(model, config)))


def make_rollout_source(config: Config, student_engine: RolloutEngine, teacher: Optional[torch.nn.Module],
                        tokenizer: Any, encode: Any, student_scorer: LocalTeacher) -> RolloutSource:
    """The engines ``rollout.policy`` can pick from at each step (the student's is always there)."""
    rollout = config.rollout
    engines: dict[str, Any] = {"student": student_engine}
    writers = batch_writers(rollout)
    if teacher is not None and "teacher" in writers:
        engines["teacher"] = engine_for(teacher, config, tokenizer, encode)
    if "dataset" in writers:
        engines["dataset"] = DatasetResponses(tokenizer, encode, student_scorer)
    return RolloutSource(rollout.policy, engines, config.train.seed, rollout.on_policy_fraction,
                         rollout.off_policy_source)


def make_teacher_scorer(config: Config, cache: Optional[TeacherCache], routed: Optional[RoutedTeacher],
                        teacher: Optional[torch.nn.Module], student: torch.nn.Module, device: torch.device,
                        encode: Any, tokenizer: Any, train_problems: list[Problem]) -> Optional[Teacher]:
    """Who scores the student's tokens: the cache, the routed teachers, the student with privileged
    context (OPSD), or ``model.teacher`` (None: nothing is distilled)."""
    if cache is not None:
        return CachedTeacher(cache)
    if routed is not None:
        return routed
    if config.model.teacher == SELF:
        initial = load_model(config.model.student, config.model, device, trainable=False) \
            if config.self_teacher.mode == "frozen" else None
        scorer = SelfTeacher(config.self_teacher, student, initial, encode, tokenizer.pad_token_id,
                             scorer_of=lambda model: make_scorer(model, config))
        scorer.check(train_problems, config.data.train)  # every privileged prompt fits, before training
        return scorer
    return make_scorer(teacher, config) if teacher is not None else None


def restore_optimization(config: Config, previous: Optional[Resume], student: torch.nn.Module,
                         optimizer: torch.optim.Optimizer, scheduler: Any, prompt_order: PromptSampler,
                         num_problems: int) -> tuple[int, int]:
    """Optimizer, scheduler and data order from the checkpoint; returns (step, non-finite streak)."""
    if previous is None:
        return 0, 0
    state = previous.state
    try:
        load_optimizer_state(student, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError) as error:  # e.g. LoRA switched on or off since the checkpoint
        raise ckpt.CheckpointError(f"{previous.path}: the optimizer state does not fit this model ({error})") \
            from None
    saved_count = int(state["prompt_order"].get("num_problems", num_problems))
    if saved_count != num_problems:
        raise ckpt.CheckpointError(f"{previous.path}: the run was trained on {saved_count} problems, but "
                                   f"data.train={config.data.train} has {num_problems}; the data order "
                                   "cannot be resumed")
    prompt_order.load_state_dict(state["prompt_order"])
    return int(state["step"]), int(state.get("nonfinite_streak", 0))


def restore_state(run: Run, previous: Resume) -> None:
    """The teacher's and the objective's state, then the random generators (last: they continue
    exactly from the checkpoint moment)."""
    state = previous.state
    if run.teacher_scorer is not None:
        # "self_teacher": the key of checkpoints written before the Teacher protocol had state_dict
        run.teacher_scorer.load_state_dict(state.get("teacher", state.get("self_teacher", {})))
    run.objective.load_state_dict(state.get("objective", {}))
    ckpt.set_rng_state(state["rng"])
    if run.dist.rank > 0:  # rank 0's state was saved; the others get their own stream from it
        seed_everything(run.config.train.seed + run.dist.rank + 1_000_003 * run.step)
