"""A frozen causal LM on this process: the teacher, the reference, or the student scoring its own rows."""
from __future__ import annotations

import torch

from kdrl.batching import length_buckets, response_lengths
from kdrl.config import Config
from kdrl.models import logit_scale, output_projection, response_hidden_states, token_logprobs_from_hidden
from kdrl.teachers.base import Teacher
from kdrl.types import Rollouts, TeacherOutput


class LocalTeacher(Teacher):
    """Reads the same prompt and response tokens as the student; no gradient."""

    def __init__(self, model: torch.nn.Module, micro_batch_size: int = 64, chunk_size: int = 1024,
                 temperature: float = 1.0):
        self.model = model
        self.temperature = temperature  # scored at the sampling temperature, like the student
        self.micro_batch_size = micro_batch_size
        self.chunk_size = chunk_size

    @torch.no_grad()
    def score(self, rollouts: Rollouts, need_hidden: bool = False) -> TeacherOutput:
        device = next(self.model.parameters()).device
        weight, bias = output_projection(self.model)
        scale = logit_scale(self.model)
        input_ids, attention_mask = rollouts.input_ids(), rollouts.attention_mask()
        width = rollouts.prompt_ids.shape[1]
        lengths = response_lengths(rollouts.response_mask)
        token_logprobs = torch.zeros(rollouts.response_ids.shape)
        hiddens = None
        # rows of similar length together, each micro-batch cut to its longest response (kdrl.batching)
        for rows in length_buckets(lengths, self.micro_batch_size, width):
            length = max(1, int(lengths[rows].max()))
            hidden = response_hidden_states(self.model, input_ids[rows, :width + length].to(device),
                                            attention_mask[rows, :width + length].to(device), width)
            token_logprobs[rows, :length] = token_logprobs_from_hidden(
                hidden, weight, bias, rollouts.response_ids[rows, :length].to(device), self.chunk_size,
                scale / self.temperature).cpu()
            if need_hidden:
                if hiddens is None:
                    hiddens = hidden.new_zeros(*rollouts.response_ids.shape, hidden.shape[-1])
                hiddens[rows.to(device), :length] = hidden * scale if scale != 1.0 else hidden
        return TeacherOutput(token_logprobs=token_logprobs * rollouts.response_mask, hidden_states=hiddens,
                             output_weight=weight if need_hidden else None,
                             output_bias=(bias * scale if scale != 1.0 else bias) if need_hidden and bias is not None
                             else None)


def make_scorer(model: torch.nn.Module, config: Config) -> LocalTeacher:
    """The scorer of ``model`` with the run's micro-batch, chunk size and sampling temperature."""
    return LocalTeacher(model, config.train.micro_batch_size, config.objective.chunk_size,
                        config.rollout.temperature)
