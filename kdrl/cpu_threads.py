"""How many threads torch uses on CPU: measured at start-up on the student itself, never more than
torch's default.

Small models are bound by per-operation overhead, which extra threads only add to (and on a machine
shared with other jobs, threads that wait on each other's barriers can make a step many times slower);
large ones are bound by matrix products, which threads speed up. Which regime a run is in depends on
the model and on how busy the machine is, so a rule on parameter count alone is wrong on one side or
the other: instead each candidate count runs the same short forward passes, alternating so that a
change in load hits all of them, and the fastest wins.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch

PROBE_FLOPS = 2e9  # per probe forward: long enough to time, short next to a training step
REPEATS = 3  # rounds; each candidate's best round counts


def candidate_counts(default: int) -> list[int]:
    """1, 2, 4, ... up to torch's default, and the default itself."""
    counts, count = [], 1
    while count < default:
        counts.append(count)
        count *= 2
    return counts + [default]


def probe_inputs(model: torch.nn.Module) -> list[torch.Tensor]:
    """A prefill-like batch and a decode-like batch (one token per row), sized to the model so a
    probe costs about PROBE_FLOPS; fixed token ids, so no random generator is drawn from."""
    params = sum(p.numel() for p in model.parameters())
    tokens = int(max(8, min(512, PROBE_FLOPS / (2 * max(params, 1)))))
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2) or 2)
    rows = max(1, tokens // 32)
    prefill = (torch.arange(rows * max(1, tokens // rows)) % vocab).view(rows, -1)
    decode = (torch.arange(max(1, tokens // 8)) % vocab).view(-1, 1)
    return [prefill, decode]


def time_forward(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for ids in batches:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return time.perf_counter() - start


@torch.no_grad()
def fastest_thread_count(model: torch.nn.Module, default: Optional[int] = None,
                         timer: Callable[[torch.nn.Module, list[torch.Tensor]], float] = time_forward) -> int:
    """The candidate count whose forward passes ran fastest (ties go to the fewer threads)."""
    entry = torch.get_num_threads()
    default = default or entry
    counts = candidate_counts(default)
    if len(counts) == 1:
        return default
    batches = probe_inputs(model)
    was_training = model.training
    model.eval()
    times: dict[int, list[float]] = {count: [] for count in counts}
    try:
        for round_index in range(REPEATS + 1):  # round 0 warms up allocations and kernels: not counted
            for count in counts:
                torch.set_num_threads(count)
                elapsed = timer(model, batches)
                if round_index:
                    times[count].append(elapsed)
    finally:
        torch.set_num_threads(entry)
        model.train(was_training)
    best = {count: min(values) for count, values in times.items()}
    return min(counts, key=lambda count: (best[count], count))


def apply_cpu_threads(threads: int, device: torch.device, student: torch.nn.Module) -> int:
    """``train.cpu_threads``: a positive count is used as given; 0 measures (``fastest_thread_count``).
    Returns the count in force (nothing changes off the CPU)."""
    if device.type != "cpu":
        return torch.get_num_threads()
    if threads == 0:
        threads = fastest_thread_count(student)
    torch.set_num_threads(threads)
    return threads
