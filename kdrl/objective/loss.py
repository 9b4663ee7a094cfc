"""The one unified objective (METHODS.md §1-4): every method is a setting of it.

    L = Σ_t w_t · [ pg_coef·L_pg + β·m_i·u_t·k(Δ_t) + ref_kl_coef·k_ref + nll_coef·n_i·(−s_t) − entropy_coef·H_t ]

where w_t are the loss-aggregation weights (``loss_agg``), normalised over the FULL batch
by ``prepare`` so that micro-batch losses add up to the batch loss. The KD term sits either
in the loss (KDRL: k2, k3, rkl, fkl, jsd, topk) or in the advantage (OPD: Â = A − β·m·u·sg(D)).
The related methods of METHODS.md §6 are settings of the same pieces: m_i and n_i also take
per-row weights (``row_weights``: SCOPE), u_t selects the KD tokens (``kd_token_selection``:
TIP), D takes G-OPD's reward scale λ against a reference (``kd_reward_scale``: ExOPD), and the
PG ratio's denominator can be anchored to π_old^α·π_T^(1−α) (``ratio_anchor_alpha``: RLAD).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Optional

import torch

from kdrl.config import ConfigError, ObjectiveConfig
from kdrl.config_needs import ObjectiveInputs, missing_batch_input, objective_inputs
from kdrl.config_rules import objective_errors
from kdrl.objective.advantages import ADVANTAGES
from kdrl.objective.divergences import SAMPLED_KL, upcast, vocab_terms_chunked
from kdrl.objective.policy_gradient import OFFPOLICY_PG, PGTokens, clipped, importance_ratio, policy_gradient
from kdrl.objective.controllers import BETA_CONTROLLERS, measured_kl
from kdrl.objective.schedules import ADAPTIVE, BETA_SCHEDULES, PHASES, beta_at, switch_step
from kdrl.objective.weights import KD_MASKS, LOSS_AGGREGATIONS, ROW_WEIGHTS, TOKEN_SELECTIONS, identity
from kdrl.types import Problem, StudentOutput, TrainBatch

Tensor = torch.Tensor


# --------------------------------------------------------------------------- per-token terms

def offpolicy_weight(ratio: Tensor, off_policy: Tensor, cap: float) -> Tensor:
    """sg(min(ρ, c)) on tokens not sampled from the current π_θ, 1 elsewhere (METHODS.md §4,
    last paragraph; c = 2 is an assumption): keeps the k2 gradient's expectation near ∇KL."""
    return torch.where(off_policy, ratio.detach().clamp(max=cap), torch.ones_like(ratio))


def discounted_future_sum(values: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """D̃_t = Σ_{t'≥t} γ^{t'−t} D_t' within the response mask (γ = 0: D_t itself; METHODS.md §3)."""
    values = values * mask
    if gamma == 0.0:
        return values
    if gamma == 1.0:
        return values.flip(-1).cumsum(-1).flip(-1) * mask
    out, running = torch.zeros_like(values), torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        running = values[:, t] + gamma * running
        out[:, t] = running
    return out * mask


def kd_advantage(sampler_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor, gamma: float,
                 reward_scale: float = 1.0, reference_logprobs: Optional[Tensor] = None) -> Tensor:
    """D_{i,t} = sg(s_old − τ): the sampled reverse-KL k1 with the SAMPLER's log-probs (OPD, METHODS.md §3).

    With a reference ℓ = log π_ref (G-OPD / ExOPD, METHODS.md §6 ``exopd``), D = sg(s_old − τ) −
    (λ − 1)·sg(τ − ℓ), so that −D = λ(τ − ℓ) − (s_old − ℓ): λ scales the implicit reward
    log π_T/π_ref; λ = 1 is OPD exactly ((λ − 1)·x is ±0), λ > 1 extrapolates past the teacher.
    """
    teacher = upcast(teacher_logprobs)
    delta = upcast(sampler_logprobs) - teacher
    if reference_logprobs is not None:
        delta = delta - (reward_scale - 1.0) * (teacher - upcast(reference_logprobs))
    elif reward_scale != 1.0:
        raise ValueError("objective.kd_reward_scale != 1 needs the reference log-probs (model.reference)")
    return discounted_future_sum(delta.detach(), mask, gamma)


def check_inputs(batch: TrainBatch, inputs: ObjectiveInputs) -> None:
    """Every input the objective reads is in the batch (``kdrl.config_needs`` says which and why)."""
    problem = missing_batch_input(batch, inputs)
    if problem is not None:
        raise ValueError(problem)


def kd_row_coef(batch: TrainBatch) -> Tensor | float:
    """The per-row KD coefficient (several teachers, each with its own β multiplier), 1 if unset."""
    return 1.0 if batch.kd_coef is None else upcast(batch.kd_coef)


# --------------------------------------------------------------------------- the objective

class Objective:
    """``prepare`` once per rollout batch, then ``loss`` per micro-batch (a ``batch.rows`` slice).

    - ``max_response_len``: the generation budget, the constant normaliser of Dr. GRPO's
      ``seq_mean_token_sum_norm``.
    - ``correct_threshold``: a reward at or above it counts as correct (KD masks, nll_rows).
    - ``all_reduce_sum``: sums a normaliser over data-parallel ranks (identity on one process),
      so each rank's loss is its share of ONE global mean; with DDP/FSDP averaging gradients
      over ranks, multiply the loss by the world size (or reduce gradients by sum).
    - ``temperature``: the sampling temperature; both models' logits are divided by it so
      the student's log-probs match the sampler's (the teacher's sampled log-probs should be
      scored at the same temperature).
    - ``kd_coef_of``: each row's problem -> its β multiplier [B] (several teachers, one per route,
      ``kdrl.teachers.routed``); a weight of the objective, computed in ``prepare`` (None: 1).
    """

    def __init__(self, cfg: ObjectiveConfig, total_steps: int, max_response_len: int,
                 correct_threshold: float = 1.0, all_reduce_sum: Optional[Callable[[Tensor], Tensor]] = None,
                 temperature: float = 1.0, kd_coef_of: Optional[Callable[[list[Problem]], Tensor]] = None):
        for value, registry, key in [(cfg.advantage, ADVANTAGES, "advantage"), (cfg.kd_mask, KD_MASKS, "kd_mask"),
                                     (cfg.loss_agg, LOSS_AGGREGATIONS, "loss_agg"),
                                     (cfg.row_weights, ROW_WEIGHTS, "row_weights"),
                                     (cfg.kd_token_selection, TOKEN_SELECTIONS, "kd_token_selection"),
                                     (cfg.offpolicy_pg, OFFPOLICY_PG, "offpolicy_pg"),
                                     (cfg.beta.schedule, {**BETA_SCHEDULES, ADAPTIVE: None}, "beta.schedule"),
                                     (cfg.phases, PHASES, "phases")]:
            if value not in registry:
                raise ValueError(f"objective.{key}: unknown {value!r} (valid: {', '.join(registry)})")
        for key, message in objective_errors(cfg):  # the rules config.validate applies, once
            raise ConfigError(f"{key}: {message}")
        self.cfg = cfg
        self.total_steps = total_steps
        self.max_response_len = max_response_len
        self.correct_threshold = correct_threshold
        self.all_reduce_sum = all_reduce_sum or identity
        self.temperature = temperature
        self.kd_coef_of = kd_coef_of
        self.inputs = objective_inputs(cfg)  # what the run loads (kdrl.config_needs, the one rule)
        self.needs_teacher = bool(self.inputs.teacher_logprobs)
        self.needs_teacher_hidden = bool(self.inputs.teacher_hidden)
        self.needs_reference = bool(self.inputs.reference_logprobs)
        self.kd_in_loss = cfg.kd_placement == "loss"
        # with no outcome advantage and no KD in the advantage, Â ≡ 0: the PG term is skipped
        self.uses_pg = cfg.pg_coef != 0 and (cfg.advantage != "none" or cfg.kd_placement == "advantage")
        self._divergence_kwargs = {"jsd": {"beta": cfg.jsd_beta}, "topk": {"k": cfg.kd_topk}}.get(cfg.kd_estimator, {})
        self.switch_step = switch_step(cfg.switch_fraction, cfg.switch_step, total_steps)  # S of the phases
        self.beta_controller = BETA_CONTROLLERS[cfg.beta.controller.rule](cfg.beta) \
            if cfg.beta.schedule == ADAPTIVE else None  # kdrl_auto

    # ----------------------------------------------------------------------- coefficients per step

    def coefficients(self, step: int) -> tuple[float, float]:
        """(β_t, pg_coef_t): the schedule's (or the controller's) β and pg_coef, times the phase factors."""
        kd_on, pg_on = PHASES[self.cfg.phases](step, self.switch_step)
        beta = self.beta_controller.beta if self.beta_controller is not None \
            else beta_at(self.cfg.beta, step, self.total_steps)
        return beta * kd_on, self.cfg.pg_coef * pg_on

    def inputs_at(self, step: int) -> ObjectiveInputs:
        """What step ``step`` reads: ``self.inputs`` less the inputs of a term whose coefficient is 0
        then (kd_then_rl after its switch step scores with no teacher)."""
        return self._inputs_for(*self.coefficients(step))

    def _inputs_for(self, beta: float, pg_coef: float) -> ObjectiveInputs:
        return objective_inputs(self.cfg, kd_on=beta != 0, pg_on=self.uses_pg and pg_coef != 0)

    # ----------------------------------------------------------------------- state across steps

    def after_update(self, metrics: dict[str, Any]) -> None:
        """Called by the trainer after each optimizer step with that step's update metrics, reduced
        over ranks (so every rank's controller sees the same global KL and keeps the same β): the β
        controller (kdrl_auto) takes its KL measurement; nothing to adapt otherwise. A skipped
        update (on any rank: ``skipped`` is averaged) is no measurement."""
        if self.beta_controller is not None and not metrics.get("skipped"):
            self.beta_controller.update(measured_kl(metrics, self.cfg.kd_estimator))

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps to resume the objective exactly (``trainer_state["objective"]``)."""
        return {} if self.beta_controller is None else {"beta_controller": self.beta_controller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``'s output (the β controller's state, if there is one)."""
        if self.beta_controller is None:
            return
        if "beta_controller" not in state:
            raise ValueError("objective.beta.schedule=adaptive: the checkpoint holds no beta controller state, "
                             "so beta cannot resume where it was")
        self.beta_controller.load_state_dict(state["beta_controller"])

    # ----------------------------------------------------------------------- once per batch

    def prepare(self, batch: TrainBatch, step: int) -> TrainBatch:
        """Advantages, masks, token weights and β for one rollout batch (a new TrainBatch)."""
        beta, pg_coef = self.coefficients(step)
        kd_on = beta != 0  # β_t = 0: no KD term this step, and no teacher read for it
        if kd_on and (self.cfg.kd_placement == "advantage" or self.cfg.kd_token_selection != "all"):
            check_inputs(batch, self.inputs_at(step))  # prepare reads the teacher: fail before any forward
        if self.kd_coef_of is not None:  # several teachers: each row's route multiplies β
            batch = replace(batch, kd_coef=self.kd_coef_of(
                [batch.problems[b // batch.group_size] for b in range(batch.num_rows)]))
        cfg, mask = self.cfg, upcast(batch.response_mask)
        rewards = upcast(batch.rewards)
        outcome = ADVANTAGES[cfg.advantage](rewards, batch.group_size)  # A_i, §1
        kd_rows, nll_rows = ROW_WEIGHTS[cfg.row_weights](batch, self.correct_threshold, cfg)  # SCOPE, §6
        kd_mask = KD_MASKS[cfg.kd_mask](rewards, batch.group_size, self.correct_threshold) * kd_rows  # m_i, §5
        kd_tokens = self._kd_token_weights(batch, mask) if kd_on else None  # which tokens carry KD (TIP, §6)
        advantages = outcome[:, None] * mask
        if cfg.kd_placement == "advantage" and kd_on:  # Â = A − β·m·sg(D), §3 (OPD); G-OPD's λ, §6
            kd = kd_advantage(batch.sampler_logprobs, batch.teacher_logprobs, mask, cfg.kd_gamma,
                              cfg.kd_reward_scale, batch.reference_logprobs)
            kd_rows = kd_mask * kd_row_coef(batch)
            advantages = advantages - beta * kd_rows[:, None] * (kd if kd_tokens is None else kd * kd_tokens)
        correct = (rewards >= self.correct_threshold).to(rewards.dtype)
        nll_mask = torch.ones_like(rewards) if cfg.nll_rows == "all" else correct  # "correct": rejection sampling
        nll_mask = nll_mask * nll_rows
        token_weights = LOSS_AGGREGATIONS[cfg.loss_agg](mask, self.max_response_len, self.all_reduce_sum)
        return replace(batch, advantages=advantages, kd_mask=kd_mask, nll_mask=nll_mask,
                       token_weights=token_weights, kd_token_weights=kd_tokens, beta=beta, pg_coef=pg_coef)

    def minibatch(self, batch: TrainBatch, rows: Tensor) -> TrainBatch:
        """The prepared batch's ``rows`` as one optimizer step's batch (``train.updates_per_batch`` > 1):
        the loss aggregation recomputed over these rows (all ranks' share of them), so token_mean
        divides by this minibatch's token count, not the whole batch's."""
        sub = batch.rows(rows)
        weights = LOSS_AGGREGATIONS[self.cfg.loss_agg](upcast(sub.response_mask), self.max_response_len,
                                                       self.all_reduce_sum)
        return replace(sub, token_weights=weights)

    def _kd_token_weights(self, batch: TrainBatch, mask: Tensor) -> Optional[Tensor]:
        """None (every token) or [B, R] weights of the KD term from TOKEN_SELECTIONS. TIP's δ_t is
        |s_old − τ|, the sampled-token log-ratio (assumption: the full-vocabulary divergence would
        need the student's whole distribution here, before the update's forward pass)."""
        if self.cfg.kd_token_selection == "all" or self.cfg.kd_placement == "none":
            return None
        divergence = (upcast(batch.sampler_logprobs) - upcast(batch.teacher_logprobs)).abs() * mask
        return TOKEN_SELECTIONS[self.cfg.kd_token_selection](batch, divergence, self.cfg)

    def prepare_metrics(self, batch: TrainBatch) -> dict[str, float]:
        """Batch-level numbers of a prepared batch (this process's rows)."""
        valid = batch.response_mask > 0
        advantages = batch.advantages[valid]
        groups = batch.rewards.float().reshape(-1, batch.group_size)
        return {
            "beta": float(batch.beta),
            "kd_mask_fraction": batch.kd_mask.float().mean().item(),
            "nll_fraction": batch.nll_mask.float().mean().item(),
            "advantage_mean": advantages.mean().item() if advantages.numel() else 0.0,
            "advantage_std": advantages.std(correction=0).item() if advantages.numel() else 0.0,
            "reward_mean": batch.rewards.float().mean().item(),
            "uniform_group_fraction": (groups.amax(1) == groups.amin(1)).float().mean().item(),
            **({} if batch.on_policy is None else {"on_policy_rows": batch.on_policy.float().mean().item()}),
            **self._token_selection_metrics(batch, valid),
            **({} if self.cfg.phases == "joint" else {"pg_coef": float(batch.pg_coef)}),
        }

    @staticmethod
    def _token_selection_metrics(batch: TrainBatch, valid: Tensor) -> dict[str, float]:
        """TIP: the fraction of response tokens that carry KD, and the memory a KD term formed on the
        kept tokens only would not need: skipped tokens × V × 4 bytes × 2 (float32 logits of student
        and teacher). CALCULATED, not measured: this implementation forms the chunked terms at every
        position and weights the skipped ones by 0."""
        if batch.kd_token_weights is None:
            return {}
        kept = int((batch.kd_token_weights[valid] > 0).sum())
        total = int(valid.sum())
        metrics = {"kd_token_fraction": kept / max(1, total)}  # of the response tokens
        if batch.teacher_output_weight is not None:
            vocab = batch.teacher_output_weight.shape[0]
            metrics["kd_logit_memory_saved_mb_calculated"] = (total - kept) * vocab * 4 * 2 / 2 ** 20
        return metrics

    # ----------------------------------------------------------------------- once per micro-batch

    def loss(self, batch: TrainBatch, student: StudentOutput, off_policy: bool = False
             ) -> tuple[Tensor, dict[str, Tensor]]:
        """This micro-batch's share of the batch loss, and its share of each metric.

        The metrics: ``loss`` is the optimised value; ``pg_loss`` and ``kd_loss`` are the PG and KD
        terms' parts of it, coefficient included (pg_coef_t·L_pg and β_t·m·u·k; 0 when the term is
        off), so that with no other term ``loss = pg_loss + kd_loss``; ``kd_value``, ``ref_kl``,
        ``nll`` and ``entropy`` are per-token values before their coefficient.

        ``off_policy``: the rollouts were not sampled by the current weights (a later optimizer
        step on the same batch); rows with ``batch.on_policy == 0`` are treated so regardless.
        """
        cfg = self.cfg
        if batch.token_weights is None:
            raise ValueError("call Objective.prepare on the batch before Objective.loss")
        reads = self._inputs_for(batch.beta, batch.pg_coef)
        check_inputs(batch, reads)
        valid = batch.response_mask > 0  # work on the N response tokens only, flattened

        def per_token(rows: Tensor) -> Tensor:  # [B] -> [N]
            return rows[:, None].expand_as(valid)[valid]

        w = upcast(batch.token_weights[valid])
        s_old = upcast(batch.sampler_logprobs[valid])
        s, entropy, divergence = vocab_terms_chunked(
            student.hidden_states[valid], student.output_weight, student.output_bias, batch.response_ids[valid],
            *self._teacher_hidden(batch, valid, reads), divergence=cfg.kd_estimator if reads.teacher_hidden else None,
            teacher_bias=batch.teacher_output_bias if reads.teacher_hidden else None,
            chunk_size=cfg.chunk_size, temperature=self.temperature, entropy_grad=cfg.entropy_coef != 0,
            **self._divergence_kwargs)
        ratio = importance_ratio(s, s_old)
        is_weight = offpolicy_weight(ratio, per_token(self._off_policy_rows(batch, off_policy)),
                                     cfg.offpolicy_ratio_cap)
        advantages = upcast(batch.advantages[valid])
        teacher = None if batch.teacher_logprobs is None else upcast(batch.teacher_logprobs[valid])

        # per-token terms [N]
        not_sampled = None if batch.on_policy is None else per_token(batch.on_policy == 0)
        pg, pg_ratio = policy_gradient(PGTokens(s, s_old, advantages, teacher, not_sampled), cfg)  # §4; RLAD, AMPO §6
        kd_value = self._kd_value(s, teacher, divergence)  # k(Δ_t), §2; None: not measured (β_t = 0)
        kd = batch.beta * per_token(upcast(batch.kd_mask) * kd_row_coef(batch)) * self._sampled_correction(is_weight) \
            * kd_value if kd_value is not None else torch.zeros_like(s)  # §3
        if batch.kd_token_weights is not None:  # token selection (TIP, §6)
            kd = kd * upcast(batch.kd_token_weights[valid])
        ref_kl = self._ref_kl(s, batch, valid)  # §4, optional
        nll = per_token(upcast(batch.nll_mask)) * -s  # SFT / rejection sampling

        total = 0.0 * s  # attached to the graph even if every coefficient is 0
        pg_term = batch.pg_coef * pg if self.uses_pg else torch.zeros_like(s)  # pg_coef_t (prepare: the phases)
        total = total + pg_term
        if self.kd_in_loss:
            total = total + kd
        else:
            kd = torch.zeros_like(s)  # KD absent, or carried by the advantage
        if cfg.ref_kl_coef != 0:
            total = total + cfg.ref_kl_coef * is_weight * ref_kl
        if cfg.nll_coef != 0:
            total = total + cfg.nll_coef * nll
        if cfg.entropy_coef != 0:
            total = total - cfg.entropy_coef * entropy
        loss = (total * w).sum()

        def share(values: Tensor) -> Tensor:  # this micro-batch's part of a full-batch weighted mean
            return (upcast(values.detach()) * w).sum()

        metrics = {
            "loss": loss.detach(), "pg_loss": share(pg_term), "kd_loss": share(kd),
            "nll": share(nll), "entropy": share(entropy),
            "clip_fraction": share(clipped(pg_ratio, advantages, cfg.clip_eps_low, cfg.clip_eps_high).float()),
            "ratio_mean": share(ratio), "logprob_gap": share((s - s_old).abs()),
        }
        if kd_value is not None:
            metrics["kd_value"] = share(kd_value)
        if teacher is not None:
            metrics["kl_sampled"] = share(s - teacher)  # k1: unbiased sampled estimate of KL(π_θ‖π_T)
        if batch.reference_logprobs is not None:
            metrics["ref_kl"] = share(ref_kl)
        return loss, metrics

    # ----------------------------------------------------------------------- helpers

    @staticmethod
    def _teacher_hidden(batch: TrainBatch, valid: Tensor, reads: ObjectiveInputs
                        ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        if not reads.teacher_hidden:
            return None, None
        return batch.teacher_hidden[valid], batch.teacher_output_weight

    @staticmethod
    def _off_policy_rows(batch: TrainBatch, off_policy: bool) -> Tensor:
        """[B] bool: rows not sampled by the current π_θ (a later update, or teacher / dataset rows)."""
        rows = torch.full_like(batch.rewards, off_policy, dtype=torch.bool)
        return rows if batch.on_policy is None else rows | (batch.on_policy == 0)

    def _kd_value(self, s: Tensor, teacher: Optional[Tensor], divergence: Optional[Tensor]) -> Optional[Tensor]:
        """k(Δ_t) per token: the sampled estimator, or the full-vocabulary divergence (§2); None when
        the teacher input it needs was not read (β_t = 0)."""
        if divergence is not None:
            return divergence
        if self.cfg.kd_placement == "none":
            return torch.zeros_like(s)
        if teacher is None or self.cfg.kd_estimator not in SAMPLED_KL:
            return None
        return SAMPLED_KL[self.cfg.kd_estimator](s, teacher)

    def _sampled_correction(self, is_weight: Tensor) -> Tensor | float:
        """The off-policy weight applies to the sampled estimators (k2, k3; also the reference KL),
        not to full-vocabulary divergences, which do not depend on which token was sampled."""
        return is_weight if self.cfg.kd_estimator in SAMPLED_KL else 1.0

    def _ref_kl(self, s: Tensor, batch: TrainBatch, valid: Tensor) -> Tensor:
        if batch.reference_logprobs is None:  # not read (check_inputs)
            return torch.zeros_like(s)
        return SAMPLED_KL[self.cfg.ref_kl_estimator](s, upcast(batch.reference_logprobs[valid]))
