"""Typed configuration: every default lives here, once.

The defaults are sized for the embedded default run (the bundled task and tiny models on CPU);
recipes/paper/ shows the values for real checkpoints on GPUs (learning rate ~1e-6, beta ~1e-3).

A recipe is a YAML file whose keys mirror these dataclasses; ``key=value`` overrides
use dotted paths (``objective.beta.initial=0.01``). An unknown key or a bad value is a
``ConfigError`` that names the key and suggests the closest valid one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from kdrl.config_io import ConfigError, apply_override, build, read_recipe

BUNDLED = "bundled"  # prefix naming the shipped demo assets, e.g. "bundled:student"


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelConfig:
    student: str = "bundled:student"
    # "self": the student itself, given privileged context (OPSD; see SelfTeacherConfig)
    teacher: Optional[str] = "bundled:teacher"
    # frozen reference policy for objective.ref_kl and exopd's objective.kd_reward_scale; "student" = the initial student
    reference: Optional[str] = None
    trust_remote_code: bool = False  # never run a checkpoint's own code unless asked
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    train: str = "bundled:train"  # JSONL / Parquet file, a directory saved by datasets, or bundled:SPLIT
    eval: list[str] = field(default_factory=lambda: ["bundled:test_id", "bundled:test_ood"])
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    solution_field: str = "solution"
    chat_template: bool = False  # apply the tokenizer's chat template (needs one)
    system_prompt: Optional[str] = None
    prompt_template: str = "{prompt}"  # applied to the prompt text before the chat template
    max_prompt_tokens: int = 512
    shuffle: bool = True


@dataclass
class VllmConfig:
    """rollout.engine=vllm: vLLM in the trainer's process, the student's weights pushed after every update.

    Defaults fit the paper recipe (1.5B student, 7B teacher scoring by forward pass) on one 80 GB GPU:
    vLLM's weights + KV cache get 30% of the GPU, the rest holds the trained student, its optimizer
    state and the teacher (TRL's colocate default is also 0.3)."""

    gpu_memory_utilization: float = 0.3  # fraction of each GPU for vLLM's weights and KV cache
    tensor_parallel_size: int = 1  # GPUs per vLLM instance (one instance per training process)
    # between generation and training, free vLLM's GPU memory (1: weights to CPU, KV cache dropped;
    # 2: both dropped, as every update reloads the weights anyway; 0: never). Not on CPU (vLLM ignores it).
    sleep_level: Literal[0, 1, 2] = 1
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: the student's own dtype
    # With top_p < 1 vLLM's log-probs are renormalised over the nucleus, not kdrl's pi_old
    # (untruncated softmax(logits / T)); recompute pi_old with a forward pass of the student, as verl
    # does. false: train on vLLM's nucleus log-probs (the metric pi_old_recomputed says which).
    recompute_old_logprobs: bool = True
    enforce_eager: bool = False  # no CUDA graphs (always eager on CPU, where compiling takes minutes)
    cpu_kv_cache_gib: int = 1  # CPU only: KV cache size (VLLM_CPU_KVCACHE_SPACE)


@dataclass
class RolloutConfig:
    engine: Literal["hf", "vllm"] = "hf"  # vllm: pip install "kdrl[vllm]" (see rollout.vllm)
    vllm: VllmConfig = field(default_factory=VllmConfig)
    # who writes the responses: the student (on-policy), the teacher (SFT on teacher traces), the
    # dataset's `solution` field, or "mixed": per step, on-policy with probability on_policy_fraction,
    # else off_policy_source (GKD, arXiv 2306.13649); the choice is a function of (train.seed, step)
    policy: Literal["student", "teacher", "dataset", "mixed"] = "student"
    on_policy_fraction: float = 0.5  # GKD's lambda (mixed only); 0.5 is an assumption
    off_policy_source: Literal["dataset", "teacher"] = "dataset"  # mixed only
    prompts_per_step: int = 8
    group_size: int = 8  # G responses per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    generation_batch_size: int = 256  # rows generated at once (memory bound)


@dataclass
class RewardConfig:
    # list of "name" or "name*weight": registry names (math, exact, format) or module:function
    functions: list[str] = field(default_factory=lambda: ["math"])
    timeout_s: float = 5.0
    correct_threshold: float = 1.0  # a response counts as correct when its reward >= this


@dataclass
class SelfTeacherConfig:
    """model.teacher=self (OPSD, METHODS.md §6): the teacher is the student model reading the
    problem with privileged context (its reference ``solution``), scored on the student's tokens."""

    # the teacher's prompt text, before data.prompt_template; {solution} and {prompt} (assumption:
    # the paper's exact wording is not in METHODS.md). "{prompt}" removes the privileged context.
    context: str = "{solution}\n{prompt}"
    # frozen: the initial student (default); live: the current student; ema: a moving average of it
    mode: Literal["frozen", "live", "ema"] = "frozen"
    ema_decay: float = 0.99  # ema: teacher <- decay * teacher + (1 - decay) * student, after each update


@dataclass
class BetaControllerConfig:
    """beta.schedule=adaptive (kdrl_auto, METHODS.md §6): β follows the measured per-token reverse
    KL to the teacher (kdrl.objective.controllers): up while the student is further than ``target``
    nats/token from the teacher, down while it is closer, by at most gain x error_clip per update."""

    rule: Literal["kl_target"] = "kl_target"
    # the KL(pi_theta || pi_T) to hold, in nats/token; None: target_fraction x the first update's KL, so
    # the target follows the task's scale (assumption: 0.7; the bundled student's KL fell from 0.67 to
    # about 0.42 in 90 steps of kdrl at beta 1, and to about 0.40 at beta 5)
    target: Optional[float] = None
    target_fraction: float = 0.7
    gain: float = 0.2  # K: relative change of beta per unit of (clipped) proportional error
    error_clip: float = 0.2  # PPO's clip of the proportional error (Ziegler et al. 2019)
    min: float = 0.05  # bounds of beta
    max: float = 5.0


@dataclass
class BetaConfig:
    """KD coefficient schedule (METHODS.md §5): constant, linear decay to a floor, cosine, or
    adaptive (chosen each step by a controller, ``controller``)."""

    schedule: Literal["constant", "linear", "cosine", "adaptive"] = "constant"
    # Task-scaled (assumption for the bundled task): the sampled KL here is ~1 nat/token, three
    # orders of magnitude above the paper's LLM setting, so the paper's 2e-3 makes KD negligible.
    initial: float = 1.0
    final: float = 0.5  # floor of linear, end of cosine
    decay_per_step: float = 0.01  # linear: beta_t = max(initial - decay_per_step * t, final)
    cosine_steps: Optional[int] = None  # cosine period; default: train.steps
    controller: BetaControllerConfig = field(default_factory=BetaControllerConfig)  # adaptive only


@dataclass
class ObjectiveConfig:
    """One objective; a method is a setting of these fields (METHODS.md §1-4, §6)."""

    advantage: Literal["grpo", "drgrpo", "rloo", "none"] = "grpo"
    pg_coef: float = 1.0  # weight of the clipped policy-gradient term
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    # knowledge distillation toward the teacher
    kd_placement: Literal["loss", "advantage", "none"] = "loss"
    # rkl/fkl/jsd: exact over the vocabulary (chunked, from hidden states). The default is the exact
    # reverse KL: the quantity KDRL's k2 estimates (METHODS.md §2) without its sampling noise; on the
    # bundled task it reached 44% vs 37% for k2 at the same budget (seed 0; see README).
    kd_estimator: Literal["k1", "k2", "k3", "rkl", "fkl", "jsd", "topk"] = "rkl"
    kd_topk: int = 32  # topk: teacher's k most likely tokens plus one tail bucket
    kd_gamma: float = 0.0  # advantage placement: discount of the future KD sum (0 = per token)
    jsd_beta: float = 0.5  # generalised JSD interpolation (see objective.divergences)
    kd_mask: Literal["none", "incorrect", "group_all_wrong"] = "none"
    # policy gradient on off-policy rows (e.g. AMPO's teacher solutions): "none" = the clipped ratio
    # term as on any row; "shaped" = −A·f(π_θ), f(p) = p/(p + γ), no ratio, no clip (METHODS.md §6 ampo)
    offpolicy_pg: Literal["none", "shaped"] = "none"
    offpolicy_shaping_gamma: float = 0.1  # γ of the shaping f(p) = p/(p + γ)
    beta: BetaConfig = field(default_factory=BetaConfig)
    # coefficient phases over the run (objective.schedules.PHASES): "joint" = beta_t and pg_coef at every
    # step; "kd_then_rl" = distillation alone before the switch step S (pg_coef_t = 0), then RL alone
    # (beta_t = 0): sequential OPD-then-GRPO (arXiv 2609.04108, METHODS.md §6 kd_then_rl)
    phases: Literal["joint", "kd_then_rl"] = "joint"
    switch_fraction: float = 0.5  # S = round(switch_fraction * train.steps) (assumption: half the run)
    switch_step: Optional[int] = None  # S as a step number; overrides switch_fraction
    # exopd (G-OPD, METHODS.md §6): lambda in the advantage lambda(tau - ref) - (s_old - ref); 1 is OPD
    kd_reward_scale: float = 1.0
    # rlad: the PG ratio's denominator pi_old^alpha * pi_T^(1-alpha) (METHODS.md §6); 1 is GRPO's ratio
    ratio_anchor_alpha: float = 1.0
    # per-row KD / likelihood weights (objective.weights.ROW_WEIGHTS): none, or scope's routing by correctness
    row_weights: Literal["none", "scope"] = "none"
    scope_temperature: float = 1.0  # T of scope's group softmaxes
    # which tokens carry the KD term (objective.weights.TOKEN_SELECTIONS): all, or tip's top fraction
    kd_token_selection: Literal["all", "tip"] = "all"
    tip_keep_fraction: float = 0.2
    offpolicy_ratio_cap: float = 2.0  # c in sg(min(rho, c)) on the k2 gradient (assumption)
    # likelihood on the sampled rows (SFT on teacher traces; "correct" = rejection sampling)
    nll_coef: float = 0.0
    nll_rows: Literal["all", "correct"] = "all"
    # frozen reference-policy KL (default off: the teacher KL replaces it in KDRL)
    ref_kl_coef: float = 0.0
    ref_kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = 0.0
    chunk_size: int = 1024  # positions per chunk for vocabulary-wide terms


@dataclass
class FailedGroupsConfig:
    """What to do with a group in which every response failed (METHODS.md §6 ampo, ghpo)."""

    action: Literal["none", "hint", "teacher_solutions"] = "none"
    # ghpo: resample with the first fraction of the reference solution's characters appended to the
    # prompt, level by level, stopping at the first level where a response succeeds
    hint_fractions: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    hint_template: str = "{hint}"  # appended to the prompt; the bundled model continues the partial solution
    # ampo: replace this many rows of the group by stored teacher solutions (reward 1, off-policy rows)
    replace: int = 2
    solutions_from_data: bool = True  # use the problem's own solution field
    solution_files: list[str] = field(default_factory=list)  # JSONL of {id, solution}: one file per teacher


@dataclass
class TeacherCacheConfig:
    """Lightning OPD: responses sampled once and the teacher's log-probs stored (``kdrl cache-teacher``)."""

    path: Optional[str] = None  # a directory written by `kdrl cache-teacher`; set: no teacher is loaded
    # prompts sampled into the cache, each with rollout.group_size responses; 512 builds in ~2 minutes
    # on one CPU core for the bundled models (measured 53 s for 256)
    num_prompts: int = 512
    # log pi_old of the ratio and the k1 advantage: "recompute" = the current student's (default),
    # "cached" = the initial student's, stored with the responses
    old_logprobs: Literal["recompute", "cached"] = "recompute"


@dataclass
class TeacherRoute:
    match: list[str] = field(default_factory=lambda: ["*"])  # values of the route_by field; "*" = any
    teacher: Optional[str] = None  # a model path; None = model.teacher
    beta: float = 1.0  # this route's KD coefficient, multiplying objective.beta


@dataclass
class TeachersConfig:
    """Several teachers: one per problem, chosen by a data field (METHODS.md §6, several teachers)."""

    route_by: Optional[str] = None  # a problem field or metadata key, e.g. "domain"
    routes: list[TeacherRoute] = field(default_factory=list)  # first match wins


@dataclass
class TrainConfig:
    # Sized for the bundled run on the sums task (8 prompts x 8 responses on CPU; what it measured
    # is in the README's default-run section); recipes/paper/ holds the values for real checkpoints.
    # The bundled student is 0.21M parameters, small enough for 1e-3 (the comparison's learning rate).
    steps: int = 300
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    micro_batch_size: int = 64  # rows per forward/backward; gradients accumulate over the batch
    updates_per_batch: int = 1  # optimizer steps per rollout batch (>1 makes later ones off-policy)
    seed: int = 0
    device: str = "auto"  # auto: cuda if available, else cpu
    # CPU threads for torch; 0 = auto: the fastest of 1, 2, 4, ... and torch's default on a short
    # forward probe of the student at start-up (kdrl.cpu_threads), so never more than the default.
    cpu_threads: int = 0
    max_nonfinite_skips: int = 5  # stop after this many consecutive non-finite steps


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations during training (0: only before and after)
    before: bool = True  # evaluate the initial student too
    num_problems: int = 200
    samples: int = 1  # k for avg@k
    temperature: float = 0.0  # 0 = greedy
    max_new_tokens: Optional[int] = None  # default: rollout.max_new_tokens
    batch_size: int = 256


@dataclass
class LogConfig:
    run_dir: Optional[str] = None  # default: runs/<name>-<timestamp>
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "kdrl"
    progress: bool = True
    sample_every: int = 10  # write sample completions every N steps (0: never)
    plot: bool = True


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints (0: only the final one)
    keep_last: int = 2
    save_final: bool = True


@dataclass
class Config:
    name: str = "kdrl"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    self_teacher: SelfTeacherConfig = field(default_factory=SelfTeacherConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    failed_groups: FailedGroupsConfig = field(default_factory=FailedGroupsConfig)
    teacher_cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


K1_IN_LOSS = ("k1 in the loss has a zero-mean gradient (E[grad log pi] = 0), so it teaches nothing; "
              "use k2 (reverse KL) or k3 in the loss, or k1 with objective.kd_placement=advantage")


def objective_errors(objective: ObjectiveConfig) -> list[tuple[str, str]]:
    """(key, message) of each rule of the objective's own settings that is broken: checked once,
    here, by ``validate`` when a config is loaded and by ``Objective`` when one is built directly."""
    o = objective
    rules = [
        (o.kd_placement == "loss" and o.kd_estimator == "k1", "objective.kd_estimator", K1_IN_LOSS),
        (o.ref_kl_coef != 0 and o.ref_kl_estimator == "k1", "objective.ref_kl_estimator", K1_IN_LOSS),
        (o.kd_placement == "advantage" and o.kd_estimator != "k1", "objective.kd_estimator",
         "the advantage placement uses the sampled log-ratio k1 (METHODS.md §3)"),
        (o.kd_placement == "loss" and o.kd_estimator == "jsd" and o.jsd_beta in (0.0, 1.0), "objective.jsd_beta",
         f"JSD({o.jsd_beta:g}) is identically 0; use kd_estimator={'fkl' if o.jsd_beta == 0 else 'rkl'} for "
         "that limit"),
    ]
    return [(key, message) for broken, key, message in rules if broken]


def validate(config: Config) -> Config:
    """Range checks that types cannot express; each error names its key."""
    checks = [
        (config.rollout.group_size >= 1, "rollout.group_size", "must be at least 1"),
        (config.rollout.group_size >= 2 or config.objective.advantage == "none" or config.objective.pg_coef == 0,
         "rollout.group_size", f"must be at least 2 for the group advantage '{config.objective.advantage}'"),
        (config.rollout.prompts_per_step >= 1, "rollout.prompts_per_step", "must be at least 1"),
        (0.0 < config.rollout.top_p <= 1.0, "rollout.top_p", "must lie in (0, 1]"),
        (config.rollout.temperature > 0.0, "rollout.temperature", "must be positive"),
        (config.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be at least 1"),
        (0.0 < config.rollout.vllm.gpu_memory_utilization <= 1.0, "rollout.vllm.gpu_memory_utilization",
         "must lie in (0, 1]"),
        (config.rollout.vllm.tensor_parallel_size >= 1, "rollout.vllm.tensor_parallel_size", "must be at least 1"),
        (config.rollout.vllm.cpu_kv_cache_gib >= 1, "rollout.vllm.cpu_kv_cache_gib", "must be at least 1"),
        (not (config.rollout.engine == "vllm" and config.objective.kd_token_selection == "tip"),
         "objective.kd_token_selection", "tip needs the sampler's entropy, which rollout.engine=vllm does not "
         "return (full-vocabulary log-probs from vLLM are slow); use rollout.engine=hf"),
        (config.objective.beta.initial >= 0.0, "objective.beta.initial", "must not be negative"),
        (config.objective.beta.final >= 0.0, "objective.beta.final", "must not be negative"),
        (config.objective.beta.decay_per_step >= 0.0, "objective.beta.decay_per_step", "must not be negative"),
        (config.objective.beta.controller.target is None or config.objective.beta.controller.target > 0.0,
         "objective.beta.controller.target", "must be positive (or null: target_fraction of the first KL)"),
        (config.objective.beta.controller.target_fraction > 0.0, "objective.beta.controller.target_fraction",
         "must be positive"),
        (config.objective.beta.controller.gain > 0.0, "objective.beta.controller.gain", "must be positive"),
        (0.0 < config.objective.beta.controller.error_clip < 1.0 / config.objective.beta.controller.gain,
         "objective.beta.controller.error_clip", "must lie in (0, 1/gain): beta must stay positive"),
        (0.0 < config.objective.beta.controller.min <= config.objective.beta.controller.max,
         "objective.beta.controller.min", "must lie in (0, objective.beta.controller.max]"),
        (config.objective.beta.schedule != "adaptive" or config.objective.kd_placement != "none",
         "objective.beta.schedule", "adaptive controls the KD coefficient, but objective.kd_placement=none"),
        (0.0 <= config.objective.switch_fraction <= 1.0, "objective.switch_fraction", "must lie in [0, 1]"),
        (config.objective.switch_step is None or config.objective.switch_step >= 0, "objective.switch_step",
         "must not be negative"),
        (config.objective.phases != "kd_then_rl" or config.objective.kd_placement == "loss", "objective.phases",
         "kd_then_rl switches the PG term off before the switch step, which would also switch off KD carried "
         "by the advantage; set objective.kd_placement=loss"),
        (config.objective.clip_eps_low >= 0.0 and config.objective.clip_eps_low < 1.0, "objective.clip_eps_low",
         "must lie in [0, 1)"),
        (config.objective.clip_eps_high >= 0.0, "objective.clip_eps_high", "must not be negative"),
        *[(False, key, message) for key, message in objective_errors(config.objective)],
        (0.0 <= config.objective.kd_gamma <= 1.0, "objective.kd_gamma", "must lie in [0, 1]"),
        (0.0 <= config.objective.jsd_beta <= 1.0, "objective.jsd_beta", "must lie in [0, 1]"),
        (config.objective.offpolicy_ratio_cap > 0, "objective.offpolicy_ratio_cap", "must be positive"),
        (config.objective.kd_topk >= 1, "objective.kd_topk", "must be at least 1"),
        (config.objective.chunk_size >= 1, "objective.chunk_size", "must be at least 1"),
        (config.objective.ref_kl_coef == 0 or config.model.reference is not None, "model.reference",
         "must be set when objective.ref_kl_coef > 0 (a path, or 'student' for the initial student)"),
        (config.objective.kd_placement == "none" or config.model.teacher is not None or config.teachers.routes
         or config.teacher_cache.path is not None, "model.teacher",
         "must be set when objective.kd_placement is not none"),
        (config.objective.offpolicy_shaping_gamma > 0, "objective.offpolicy_shaping_gamma", "must be positive"),
        (config.failed_groups.replace >= 1, "failed_groups.replace", "must be at least 1"),
        (config.failed_groups.replace < config.rollout.group_size
         or config.failed_groups.action != "teacher_solutions", "failed_groups.replace", "must be below rollout.group_size (some rows stay the student's own)"),
        (all(0.0 < f <= 1.0 for f in config.failed_groups.hint_fractions), "failed_groups.hint_fractions",
         "must lie in (0, 1]"),
        (config.teacher_cache.num_prompts >= 1, "teacher_cache.num_prompts", "must be at least 1"),
        (not config.teachers.routes or config.teachers.route_by, "teachers.route_by",
         "must name the data field that picks a teacher when teachers.routes is set"),
        (config.rollout.policy != "teacher" or config.model.teacher is not None, "model.teacher",
         "must be set when rollout.policy=teacher"),
        (0.0 <= config.objective.ratio_anchor_alpha <= 1.0, "objective.ratio_anchor_alpha", "must lie in [0, 1]"),
        (config.objective.ratio_anchor_alpha == 1.0 or config.model.teacher is not None, "model.teacher",
         "must be set when objective.ratio_anchor_alpha < 1 (the ratio is anchored to the teacher)"),
        (config.objective.kd_reward_scale == 1.0 or config.objective.kd_placement == "advantage",
         "objective.kd_reward_scale", "scales the KD reward in the advantage; set objective.kd_placement=advantage"),
        (config.objective.kd_reward_scale == 1.0 or config.model.reference is not None, "model.reference",
         "must be set when objective.kd_reward_scale != 1 ('student' for the initial student, or a path)"),
        (config.objective.scope_temperature > 0, "objective.scope_temperature", "must be positive"),
        (0.0 < config.objective.tip_keep_fraction <= 1.0, "objective.tip_keep_fraction", "must lie in (0, 1]"),
        (0.0 <= config.rollout.on_policy_fraction <= 1.0, "rollout.on_policy_fraction", "must lie in [0, 1]"),
        (not (config.rollout.policy == "mixed" and config.rollout.off_policy_source == "teacher")
         or config.model.teacher is not None, "model.teacher", "must be set when rollout.off_policy_source=teacher"),
        (not (config.model.teacher == "self" and config.rollout.policy in ("teacher", "mixed")
              and (config.rollout.policy == "teacher" or config.rollout.off_policy_source == "teacher")),
         "rollout.policy", "model.teacher=self cannot write responses (it needs the student's completion to score)"),
        (0.0 <= config.self_teacher.ema_decay < 1.0, "self_teacher.ema_decay", "must lie in [0, 1)"),
        (config.train.steps >= 0, "train.steps", "must not be negative"),
        (config.train.learning_rate >= 0, "train.learning_rate", "must not be negative"),
        (config.train.cpu_threads >= 0, "train.cpu_threads", "must not be negative"),
        (config.train.micro_batch_size >= 1, "train.micro_batch_size", "must be at least 1"),
        (config.train.updates_per_batch >= 1, "train.updates_per_batch", "must be at least 1"),
        (config.train.max_grad_norm > 0, "train.max_grad_norm", "must be positive"),
        (0.0 <= config.train.adam_beta1 < 1.0, "train.adam_beta1", "must lie in [0, 1) (Adam's decay rate)"),
        (0.0 <= config.train.adam_beta2 < 1.0, "train.adam_beta2", "must lie in [0, 1) (Adam's decay rate)"),
        (config.train.weight_decay >= 0, "train.weight_decay", "must not be negative"),
        (0.0 <= config.model.lora.dropout < 1.0, "model.lora.dropout", "must lie in [0, 1)"),
        (config.model.lora.r >= 1, "model.lora.r", "must be at least 1"),
        (config.rollout.generation_batch_size >= 1, "rollout.generation_batch_size", "must be at least 1"),
        (config.eval.batch_size >= 1, "eval.batch_size", "must be at least 1"),
        (config.eval.max_new_tokens is None or config.eval.max_new_tokens >= 1, "eval.max_new_tokens",
         "must be at least 1"),
        (config.objective.beta.cosine_steps is None or config.objective.beta.cosine_steps >= 1,
         "objective.beta.cosine_steps", "must be at least 1"),
        (all(route.beta >= 0 for route in config.teachers.routes), "teachers.routes", "beta must not be negative"),
        (config.objective.nll_coef >= 0, "objective.nll_coef", "must not be negative"),
        (config.objective.ref_kl_coef >= 0, "objective.ref_kl_coef", "must not be negative"),
        (config.train.max_nonfinite_skips >= 1, "train.max_nonfinite_skips", "must be at least 1"),
        (config.eval.samples >= 1, "eval.samples", "must be at least 1"),
        (config.eval.num_problems >= 1, "eval.num_problems", "must be at least 1"),
        (config.eval.temperature >= 0, "eval.temperature", "must not be negative"),
        (config.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be at least 1"),
        (len(config.reward.functions) >= 1, "reward.functions", "must name at least one reward"),
        (config.reward.timeout_s > 0, "reward.timeout_s", "must be positive"),
        (config.data.max_prompt_tokens >= 1, "data.max_prompt_tokens", "must be at least 1"),
    ]
    _check_no_negative_counts(config)
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{key}: {message}")
    for key, template, names in [("data.prompt_template", config.data.prompt_template, ("prompt",)),
                                 ("self_teacher.context", config.self_teacher.context, ("solution", "prompt")),
                                 ("failed_groups.hint_template", config.failed_groups.hint_template, ("hint",))]:
        _check_template(key, template, names)
    return config


def _check_no_negative_counts(section: object, prefix: str = "") -> None:
    """Every integer setting is a count, a period or a seed: none means anything negative
    (``eval.every=-1`` evaluated every step, ``checkpoint.every=-2`` never saved)."""
    for item in dataclasses.fields(section):
        value, key = getattr(section, item.name), f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            _check_no_negative_counts(value, key + ".")
        elif isinstance(value, list):
            for index, element in enumerate(value):
                if dataclasses.is_dataclass(element):
                    _check_no_negative_counts(element, f"{key}[{index}].")
        elif isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ConfigError(f"{key}: must not be negative (got {value})")


def _check_template(key: str, template: str, names: tuple[str, ...]) -> None:
    """A str.format template may name only ``names``; literal braces are written twice."""
    import string

    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ConfigError(f"{key}: not a valid template ({error}); write a literal brace as {{{{ or }}}}") from None
    allowed = ", ".join("{" + name + "}" for name in names)
    for name in fields:
        if name not in names:
            raise ConfigError(f"{key}: names {{{name}}}, but only {allowed} can be filled in" if name else
                              f"{key}: has an empty {{}}; only {allowed} can be filled in")


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- recipe YAML <- overrides, validated. ``recipe=None`` is the default KDRL run."""
    config = Config()
    if recipe is not None:
        values = read_recipe(recipe)
        values.setdefault("name", Path(recipe).stem)
        try:
            config = build(Config, values)
        except ConfigError as error:
            raise ConfigError(f"{recipe}: {error}") from None
    for override in overrides or []:
        apply_override(config, override)
    return validate(config)


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    """Written whole or not at all (a temporary file renamed into place): a full disk never leaves
    half a config.yaml that a later --resume would read."""
    import os

    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
