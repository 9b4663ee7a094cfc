"""Plain data passed between the stages of a training step (DESIGN.md, "Data flow").

Every arrow of the step is a function call on one of these dataclasses of tensors.
Shapes use B = rows (prompts x group size, grouped consecutively), P = padded prompt
width (left padded), R = padded response width (right padded), V = vocabulary, H = hidden.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

import torch


@dataclass
class Problem:
    """One problem: the text the model is prompted with and its reference answer."""

    id: str
    prompt: str
    answer: str
    solution: Optional[str] = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rollouts:
    """G sampled responses per prompt, as produced by a rollout engine.

    Row b answers problem ``problems[b // group_size]``: rows of one group are consecutive.
    """

    problems: list[Problem]
    group_size: int
    prompt_ids: torch.Tensor  # [B, P] long, left padded
    prompt_mask: torch.Tensor  # [B, P] long, 1 on real prompt tokens
    response_ids: torch.Tensor  # [B, R] long, right padded with pad id after EOS
    response_mask: torch.Tensor  # [B, R] float, 1 on response tokens (EOS included)
    sampler_logprobs: torch.Tensor  # [B, R] float, log pi_old of each sampled token
    response_texts: list[str]
    truncated: torch.Tensor  # [B] bool, hit max_new_tokens without EOS
    # Per-row source: who wrote the row ("student"/"policy" are on-policy, see
    # kdrl.rollout.sources.ON_POLICY_SOURCES; "teacher", "dataset", "cache", "teacher_solution" are not).
    sources: list[str] = field(default_factory=list)
    sampler_entropy: Optional[torch.Tensor] = None  # [B, R] float, entropy of pi_old at each position

    @property
    def num_rows(self) -> int:
        return self.response_ids.shape[0]

    def row_problems(self) -> list[Problem]:
        """The problem each row answers (row b: ``problems[b // group_size]``)."""
        return [self.problems[b // self.group_size] for b in range(self.num_rows)]

    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask.long()], dim=1)


@dataclass
class TeacherOutput:
    """What a teacher says about the student's tokens.

    ``token_logprobs`` always; ``hidden_states`` + ``output_weight`` when the objective
    needs full-vocabulary terms (the logits are then formed chunk by chunk, never whole).
    """

    token_logprobs: torch.Tensor  # [B, R]
    hidden_states: Optional[torch.Tensor] = None  # [B, R, H] at the positions predicting each response token
    output_weight: Optional[torch.Tensor] = None  # [V, H]
    # [V]: the output layer's bias (scaled like the hidden states), None for a head without one; the
    # full-vocabulary terms must see the distribution the sampled token_logprobs come from
    output_bias: Optional[torch.Tensor] = None


@dataclass
class TrainBatch:
    """Everything the objective needs for one optimizer step's worth of rollouts.

    Fields after ``rewards`` are filled by ``Objective.prepare``.
    """

    input_ids: torch.Tensor  # [B, P+R]
    attention_mask: torch.Tensor  # [B, P+R]
    prompt_width: int  # P
    response_ids: torch.Tensor  # [B, R]
    response_mask: torch.Tensor  # [B, R] float
    sampler_logprobs: torch.Tensor  # [B, R]
    rewards: torch.Tensor  # [B]
    group_size: int
    teacher_logprobs: Optional[torch.Tensor] = None  # [B, R]
    teacher_hidden: Optional[torch.Tensor] = None  # [B, R, H]
    teacher_output_weight: Optional[torch.Tensor] = None  # [V, H]
    teacher_output_bias: Optional[torch.Tensor] = None  # [V]
    reference_logprobs: Optional[torch.Tensor] = None  # [B, R]
    on_policy: Optional[torch.Tensor] = None  # [B] float, 1 where the row was sampled from the student
    sampler_entropy: Optional[torch.Tensor] = None  # [B, R] entropy of pi_old (token selection, e.g. tip)
    problems: list[Problem] = field(default_factory=list)  # one per group, as in Rollouts (read by prepare)
    # Filled by Objective.prepare:
    kd_coef: Optional[torch.Tensor] = None  # [B] per-row KD coefficient multiplying beta (None: 1)
    advantages: Optional[torch.Tensor] = None  # [B, R] token-level advantage (outcome + KD-in-advantage)
    kd_mask: Optional[torch.Tensor] = None  # [B] float, reward-guided KD mask m_i
    nll_mask: Optional[torch.Tensor] = None  # [B] float, rows trained by likelihood (SFT)
    token_weights: Optional[torch.Tensor] = None  # [B, R] loss-aggregation weights; sum over the full batch = 1
    kd_token_weights: Optional[torch.Tensor] = None  # [B, R] which tokens carry the KD term (token selection)
    beta: float = 0.0
    pg_coef: float = 1.0  # pg_coef_t, the policy-gradient term's coefficient at this step

    @property
    def num_rows(self) -> int:
        return self.response_ids.shape[0]

    def rows(self, index: slice | torch.Tensor) -> "TrainBatch":
        """The sub-batch of the given rows (for gradient accumulation). Weights keep their
        full-batch normalisation, so summing micro-batch losses gives the full-batch loss.
        Row b of the sub-batch still answers ``problems[b // group_size]``: whole groups in order
        keep their grouping, any other choice of rows (length-sorted micro-batches) is groups of one."""
        updates = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == self.num_rows \
                    and f.name not in ("teacher_output_weight", "teacher_output_bias"):
                updates[f.name] = value[index]
        picked = torch.arange(self.num_rows)[index].tolist()
        size = self.group_size
        whole_groups = len(picked) % size == 0 and all(
            picked[start] % size == 0 and picked[start:start + size] == list(range(picked[start], picked[start] + size))
            for start in range(0, len(picked), size))
        if not whole_groups:
            size = 1
        problems = [self.problems[b // self.group_size] for b in picked[::size]] if self.problems else []
        return replace(self, **updates, problems=problems, group_size=size)

    def to(self, device: torch.device | str) -> "TrainBatch":
        updates = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, **updates)


@dataclass
class StudentOutput:
    """The student's forward pass at response positions, with gradient.

    ``hidden_states`` at the positions predicting each response token and the output
    projection, so every log-prob and divergence is formed chunk by chunk.
    """

    hidden_states: torch.Tensor  # [B, R, H]
    output_weight: torch.Tensor  # [V, H]
    output_bias: Optional[torch.Tensor] = None  # [V]
