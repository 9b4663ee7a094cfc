"""A frozen causal LM on this process: the teacher, the reference, or the student scoring its own rows."""
from __future__ import annotations

import torch

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
        logprobs, hiddens = [], []
        for start in range(0, rollouts.num_rows, self.micro_batch_size):
            rows = slice(start, start + self.micro_batch_size)
            hidden = response_hidden_states(self.model, input_ids[rows].to(device),
                                            attention_mask[rows].to(device), width)
            logprobs.append(token_logprobs_from_hidden(hidden, weight, bias, rollouts.response_ids[rows].to(device),
                                                       self.chunk_size, scale / self.temperature).cpu())
            if need_hidden:
                hiddens.append(hidden * scale if scale != 1.0 else hidden)
        token_logprobs = torch.cat(logprobs) * rollouts.response_mask
        return TeacherOutput(token_logprobs=token_logprobs,
                             hidden_states=torch.cat(hiddens) if need_hidden else None,
                             output_weight=weight if need_hidden else None)


def make_scorer(model: torch.nn.Module, config: Config) -> LocalTeacher:
    """The scorer of ``model`` with the run's micro-batch, chunk size and sampling temperature."""
    return LocalTeacher(model, config.train.micro_batch_size, config.objective.chunk_size,
                        config.rollout.temperature)
