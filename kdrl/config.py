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
from kdrl.config_rules import validate

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
    prompts_per_step: int = 16
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
    # Sized for the bundled run on the sums task (16 prompts x 8 responses on CPU, the method
    # comparison's setting; what it measured is in the README); recipes/paper/ holds the values for
    # real checkpoints. 3e-4 for the 0.21M bundled student: the comparison's KD methods did better
    # there than at 1e-4 (benchmarks/results/sums_lr_select/).
    steps: int = 200
    learning_rate: float = 3e-4
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
