"""How many threads torch uses on CPU: measured at start-up on the student itself, never more than
torch's default, and chosen apart for the two kinds of work a step does.

Small models are bound by per-operation overhead, which extra threads only add to (and on a machine
shared with other jobs, threads that wait on each other's barriers can make a step many times slower);
large ones are bound by matrix products, which threads speed up. Which regime a run is in depends on
the model, on how busy the machine is and on the work: a decoding step (one token per row) is small
matrix products and many small operations, scoring and training (every position of every row) are
large matrix products. So a rule on parameter count alone is wrong on one side or the other, and one
count for both kinds is wrong for one of them: instead each candidate count runs a decode-like and a
dense forward, alternating so that a change in load hits all of them, and the fastest of each kind
wins. The dense count is torch's process-wide count; the ``hf`` engine decodes under the decode count
(``decode_threads``).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

PROBE_FLOPS = 4e9  # per dense probe forward: long enough to time, short next to a training step
PROBE_TOKENS = (128, 2048)  # at least / at most this many tokens per dense probe forward (a micro-batch's worth)
DECODE_ROWS = 64  # rows of the decode-like probe: a typical generation batch (prompts x group size)
REPEATS = 3  # rounds; each candidate's best round counts


@dataclass(frozen=True)
class ThreadPolicy:
    dense: int  # scoring and training forward/backward passes (torch's process-wide count)
    decode: int  # the hf engine's decoding loop
    measured: bool = False  # chosen by the start-up probe (train.cpu_threads=0), not given

    def describe(self) -> str:
        """One line for the run's start, e.g. '2 CPU threads (1 while decoding), measured at start-up'."""
        decoding = "" if self.decode == self.dense else f" ({self.decode} while decoding)"
        how = "measured at start-up (train.cpu_threads=0)" if self.measured else "train.cpu_threads"
        return f"{self.dense} CPU thread{'s' * (self.dense > 1)}{decoding}, {how}"


_policy: Optional[ThreadPolicy] = None  # process-wide, as torch's own thread count is


def current_policy() -> Optional[ThreadPolicy]:
    return _policy


def candidate_counts(default: int) -> list[int]:
    """1, 2, 4, ... up to torch's default, and the default itself."""
    counts, count = [], 1
    while count < default:
        counts.append(count)
        count *= 2
    return counts + [default]


def probe_inputs(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A dense batch (rows of 32 tokens, sized to the model so its forward costs about PROBE_FLOPS)
    and a decode-like batch (DECODE_ROWS rows of one token); fixed token ids, so no random generator
    is drawn from."""
    params = sum(p.numel() for p in model.parameters())
    low, high = PROBE_TOKENS
    tokens = int(max(low, min(high, PROBE_FLOPS / (2 * max(params, 1)))))
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 2) or 2)
    dense = (torch.arange(tokens // 32 * 32) % vocab).view(-1, 32)
    decode = (torch.arange(DECODE_ROWS) % vocab).view(-1, 1)
    return {"dense": dense, "decode": decode}


def time_forward(model: torch.nn.Module, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return time.perf_counter() - start


@torch.no_grad()
def fastest_thread_counts(model: torch.nn.Module, default: Optional[int] = None,
                          timer: Callable[[torch.nn.Module, torch.Tensor], float] = time_forward) -> ThreadPolicy:
    """For each kind of work, the candidate count whose forward ran fastest (ties: fewer threads)."""
    entry = torch.get_num_threads()
    default = default or entry
    counts = candidate_counts(default)
    if len(counts) == 1:
        return ThreadPolicy(default, default, measured=True)
    batches = probe_inputs(model)
    was_training = model.training
    model.eval()
    times: dict[str, dict[int, list[float]]] = {kind: {count: [] for count in counts} for kind in batches}
    try:
        for round_index in range(REPEATS + 1):  # round 0 warms up allocations and kernels: not counted
            for count in counts:
                torch.set_num_threads(count)
                for kind, ids in batches.items():
                    elapsed = timer(model, ids)
                    if round_index:
                        times[kind][count].append(elapsed)
    finally:
        torch.set_num_threads(entry)
        model.train(was_training)
    best = {kind: min(counts, key=lambda count: (min(by_count[count]), count)) for kind, by_count in times.items()}
    return ThreadPolicy(dense=best["dense"], decode=best["decode"], measured=True)


def apply_cpu_threads(threads: int, device: torch.device, student: torch.nn.Module) -> ThreadPolicy:
    """``train.cpu_threads``: a positive count is used for everything; 0 measures
    (``fastest_thread_counts``). Returns the policy in force (nothing changes off the CPU)."""
    global _policy
    if device.type != "cpu":
        _policy = None
        count = torch.get_num_threads()
        return ThreadPolicy(count, count)
    policy = ThreadPolicy(threads, threads) if threads else fastest_thread_counts(student)
    torch.set_num_threads(policy.dense)
    _policy = policy
    return policy


@contextmanager
def decode_threads() -> Iterator[None]:
    """Torch's thread count set to the policy's decode count for the block (unchanged without a
    policy, e.g. off the CPU or when no run set one)."""
    entry = torch.get_num_threads()
    wanted = _policy.decode if _policy is not None else entry
    if wanted == entry:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(entry)
