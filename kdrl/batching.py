"""Micro-batches by length: rows of similar response length go together and each micro-batch is cut
to its own longest response, so short rows cost no work on padding.

Every row's loss terms and teacher log-probs depend only on that row's own tokens, and the loss
weights keep their full-batch normalisation (``TrainBatch.rows``), so a different split of the same
rows gives the same loss and gradient up to float summation order (tests/test_batching.py).
"""
from __future__ import annotations

from dataclasses import fields, replace

import torch

from kdrl.types import TrainBatch

# A forward's fixed cost (Python per layer, kernel launches) in padded-token equivalents: below it,
# splitting off a few short rows costs more than their padding does.
OVERHEAD_TOKENS = 256


def length_buckets(lengths: torch.Tensor, max_rows: int, prompt_width: int,
                   overhead_tokens: int = OVERHEAD_TOKENS) -> list[torch.Tensor]:
    """Row indices of each micro-batch (at most ``max_rows`` rows each), longest rows first.

    Rows sorted by response length are cut into consecutive runs that minimise the padded tokens
    processed, rows x (prompt + longest response in the run), plus ``overhead_tokens`` per run
    (an exact dynamic programme over the sorted rows).
    """
    count = int(lengths.shape[0])
    if count == 0:
        return []
    order = torch.sort(lengths, descending=True, stable=True).indices
    widths = [prompt_width + int(length) for length in lengths[order]]
    best = [0.0] + [float("inf")] * count  # best[i]: cheapest split of the first i sorted rows
    cut = [0] * (count + 1)
    for end in range(1, count + 1):
        for start in range(max(0, end - max_rows), end):
            cost = best[start] + (end - start) * widths[start] + overhead_tokens
            if cost < best[end]:
                best[end], cut[end] = cost, start
    runs, end = [], count
    while end > 0:
        runs.append(order[cut[end]:end])
        end = cut[end]
    return runs[::-1]


def response_lengths(response_mask: torch.Tensor) -> torch.Tensor:
    """[B] one past each row's last unmasked response position (0 for a row with none)."""
    positions = torch.arange(1, response_mask.shape[1] + 1, device=response_mask.device)
    return ((response_mask > 0) * positions).amax(-1) if response_mask.shape[1] else \
        torch.zeros(response_mask.shape[0], dtype=torch.long)


def trimmed(batch: TrainBatch, length: int) -> TrainBatch:
    """The batch with its response columns cut to ``length`` (and its input to prompt + ``length``)."""
    width = batch.response_ids.shape[1]
    total = batch.input_ids.shape[1]
    if length >= width:
        return batch
    updates = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[0] != batch.num_rows \
                or f.name == "teacher_output_weight":
            continue
        if value.shape[1] == width:
            updates[f.name] = value[:, :length]
        elif value.shape[1] == total:
            updates[f.name] = value[:, :batch.prompt_width + length]
    return replace(batch, **updates)


def micro_batches(batch: TrainBatch, rows: torch.Tensor, max_rows: int) -> list[TrainBatch]:
    """``rows`` of ``batch`` as length-bucketed micro-batches, each cut to its longest response."""
    lengths = response_lengths(batch.response_mask[rows])
    out = []
    for bucket in length_buckets(lengths, max_rows, batch.prompt_width):
        micro = batch.rows(rows[bucket])
        out.append(trimmed(micro, max(1, int(lengths[bucket].max()))))
    return out
