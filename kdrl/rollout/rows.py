"""Rollouts taken apart into rows and put back together, re-padded (prompts left, responses right).

Used where rows of a group are replaced by others with a different prompt (GHPO's hinted
prompts) or a different response (AMPO's teacher solutions); ``left_pad`` is the one prompt
padder of every engine and teacher; ``score_rewards`` the one place rows are rewarded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from kdrl.types import Problem, Rollouts


@dataclass
class Row:
    prompt_ids: torch.Tensor  # [p] long, no padding
    response_ids: torch.Tensor  # [r] long, up to and including EOS (or the budget), no padding
    sampler_logprobs: torch.Tensor  # [r]
    text: str
    truncated: bool
    source: str
    # [r] entropy of the sampler at each position (token selection, tip); None where no sampler's
    # distribution exists (an AMPO teacher solution), which pack writes as 0 (assumption)
    sampler_entropy: Optional[torch.Tensor] = None


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, P], mask [B, P]), left padded to the longest."""
    width = max(len(ids) for ids in prompts)
    ids_out = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        ids_out[row, width - len(ids):] = torch.as_tensor(ids, dtype=torch.long)
        mask[row, width - len(ids):] = 1
    return ids_out, mask


def unpack(rollouts: Rollouts) -> list[Row]:
    rows = []
    for b in range(rollouts.num_rows):
        prompt = rollouts.prompt_ids[b][rollouts.prompt_mask[b].bool()]
        length = int(rollouts.response_mask[b].sum())  # the mask is a prefix of ones
        source = rollouts.sources[b] if rollouts.sources else "policy"
        entropy = rollouts.sampler_entropy[b, :length] if rollouts.sampler_entropy is not None else None
        rows.append(Row(prompt, rollouts.response_ids[b, :length], rollouts.sampler_logprobs[b, :length],
                        rollouts.response_texts[b], bool(rollouts.truncated[b]), source, entropy))
    return rows


def pack(rows: list[Row], problems: list[Problem], group_size: int, pad_id: int) -> Rollouts:
    """Rollouts of ``rows`` (row b answers ``problems[b // group_size]``)."""
    prompt_ids, prompt_mask = left_pad([row.prompt_ids for row in rows], pad_id)
    length = max(1, max(len(row.response_ids) for row in rows))
    count = len(rows)
    response_ids = torch.full((count, length), pad_id, dtype=torch.long)
    response_mask = torch.zeros((count, length))
    sampler_logprobs = torch.zeros((count, length))
    has_entropy = any(row.sampler_entropy is not None for row in rows)
    sampler_entropy = torch.zeros((count, length)) if has_entropy else None
    for b, row in enumerate(rows):
        r = len(row.response_ids)
        response_ids[b, :r] = row.response_ids
        response_mask[b, :r] = 1.0
        sampler_logprobs[b, :r] = row.sampler_logprobs.float()
        if sampler_entropy is not None and row.sampler_entropy is not None:
            sampler_entropy[b, :r] = row.sampler_entropy.float()
    return Rollouts(problems=list(problems), group_size=group_size, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                    response_ids=response_ids, response_mask=response_mask, sampler_logprobs=sampler_logprobs,
                    response_texts=[row.text for row in rows], truncated=torch.tensor([row.truncated for row in rows]),
                    sources=[row.source for row in rows], sampler_entropy=sampler_entropy)


def subset(rollouts: Rollouts, rows: torch.Tensor) -> Rollouts:
    """The given rows, same widths, each its own group of one (for scoring part of a batch)."""
    index = rows.tolist()
    row_problems = rollouts.row_problems()
    return Rollouts(problems=[row_problems[b] for b in index], group_size=1,
                    prompt_ids=rollouts.prompt_ids[rows], prompt_mask=rollouts.prompt_mask[rows],
                    response_ids=rollouts.response_ids[rows], response_mask=rollouts.response_mask[rows],
                    sampler_logprobs=rollouts.sampler_logprobs[rows],
                    response_texts=[rollouts.response_texts[b] for b in index], truncated=rollouts.truncated[rows],
                    sources=[rollouts.sources[b] for b in index] if rollouts.sources else [],
                    sampler_entropy=rollouts.sampler_entropy[rows] if rollouts.sampler_entropy is not None else None)


def score_rewards(reward_fn: Any, rollouts: Rollouts) -> torch.Tensor:
    """[B] float: the verifier's reward of each row's response text for its problem."""
    return torch.tensor([float(reward_fn(problem, text))
                         for problem, text in zip(rollouts.row_problems(), rollouts.response_texts)])
