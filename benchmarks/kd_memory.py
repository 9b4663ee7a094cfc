"""Peak memory of a full-vocabulary KD loss and its backward pass: chunked vs plain.

    OMP_NUM_THREADS=1 python benchmarks/kd_memory.py --out benchmarks/results/kd_memory

The loss is the objective's token part with an exact full-vocabulary divergence (METHODS.md §2):
``mean(a_t · s_t + rkl_t)`` over N response positions, formed from the student's hidden states
[N, H] and output projection [V, H] and the teacher's [N, H] / [V, H] (what ``Objective.loss``
receives), then ``backward()``. ``plain`` forms [N, V] logits of both models at once
(``vocab_terms``); ``chunked`` is ``vocab_terms_chunked``, which the trainer uses.

Peak memory is read from torch's own CPU allocator accounting (the profiler's memory events:
every allocation and free of a tensor, exact, independent of the C library's caching), as the
highest live total above what existed before the loss. The plain computation at the full size
(4 x 4,096 tokens, V = 151,936) needs tens of GB, more than this machine has: it is measured at
several smaller N and its peak, linear in N (every large tensor is [N, V]), is extrapolated by a
least-squares line; the chunked one is measured at the full size. Values and gradients of the two
are compared at the largest N where both run.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kdrl.objective import vocab_terms, vocab_terms_chunked  # noqa: E402

GiB = 2 ** 30


def peak_allocated_bytes(fn: Callable[[], None]) -> int:
    """Highest total of live CPU tensor bytes allocated while ``fn`` runs, above the start."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def make_inputs(n: int, hidden: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(student_hidden=torch.randn(n, hidden, generator=g).requires_grad_(),
                weight=(torch.randn(vocab, hidden, generator=g) / hidden ** 0.5).requires_grad_(),
                token_ids=torch.randint(vocab, (n,), generator=g),
                teacher_hidden=torch.randn(n, hidden, generator=g),
                teacher_weight=torch.randn(vocab, hidden, generator=g) / hidden ** 0.5,
                advantages=torch.randn(n, generator=g))


def loss_and_backward(inputs: dict, divergence: str, chunk_size: int | None) -> dict:
    """The loss and its backward; returns the loss value, per-token terms and gradients."""
    kwargs = dict(divergence=divergence, entropy_grad=False)
    args = (inputs["student_hidden"], inputs["weight"], None, inputs["token_ids"], inputs["teacher_hidden"],
            inputs["teacher_weight"])
    if chunk_size is None:
        logprobs, entropy, div = vocab_terms(*args, **kwargs)
    else:
        logprobs, entropy, div = vocab_terms_chunked(*args, chunk_size=chunk_size, **kwargs)
    loss = (inputs["advantages"] * logprobs + div).mean()
    loss.backward()
    return {"loss": loss.detach(), "logprobs": logprobs.detach(), "div": div.detach(),
            "grad_hidden": inputs["student_hidden"].grad, "grad_weight": inputs["weight"].grad}


def measure(n: int, args, chunk_size: int | None) -> dict:
    inputs = make_inputs(n, args.hidden, args.vocab)
    out = {}
    start = time.perf_counter()
    peak = peak_allocated_bytes(lambda: out.update(loss_and_backward(inputs, args.divergence, chunk_size)))
    return {"tokens": n, "variant": "plain" if chunk_size is None else "chunked", "chunk_size": chunk_size,
            "peak_bytes": peak, "peak_gib": peak / GiB, "seconds": time.perf_counter() - start,
            "loss": float(out["loss"])}


def compare(n: int, args) -> dict:
    """Plain vs chunked on the same inputs: largest absolute and relative differences."""
    plain = loss_and_backward(make_inputs(n, args.hidden, args.vocab), args.divergence, None)
    chunked = loss_and_backward(make_inputs(n, args.hidden, args.vocab), args.divergence, args.chunk_size)
    report = {}
    for key in plain:
        diff = (plain[key] - chunked[key]).abs().max().item()
        report[key] = {"max_abs_diff": diff, "max_abs": plain[key].abs().max().item()}
        torch.testing.assert_close(chunked[key], plain[key], rtol=1e-4, atol=1e-6)  # float32 tolerance
    return report


def fit_line(points: list[tuple[int, int]]) -> tuple[float, float]:
    xs, ys = [float(x) for x, _ in points], [float(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (small: the [N, V] terms dominate)")
    parser.add_argument("--chunk-size", type=int, default=256, help="positions per chunk (the paper recipes' value)")
    parser.add_argument("--divergence", default="rkl", choices=["rkl", "fkl", "jsd", "topk"])
    parser.add_argument("--plain-tokens", default="256,512,1024", help="N at which the plain peak is measured")
    parser.add_argument("--out", default="benchmarks/results/kd_memory")
    args = parser.parse_args()
    torch.manual_seed(0)
    total = args.rows * args.length
    plain_sizes = [int(x) for x in args.plain_tokens.split(",")]

    equality = compare(plain_sizes[-1], args)
    print(f"equal values and gradients at N={plain_sizes[-1]}: {json.dumps(equality)}", flush=True)
    runs = []
    for n in plain_sizes:
        for chunk in (None, args.chunk_size):
            runs.append(measure(n, args, chunk))
            print(json.dumps(runs[-1]), flush=True)
    runs.append(measure(total, args, args.chunk_size))
    print(json.dumps(runs[-1]), flush=True)

    slope, intercept = fit_line([(r["tokens"], r["peak_bytes"]) for r in runs if r["variant"] == "plain"])
    plain_full = slope * total + intercept
    chunked_full = runs[-1]["peak_bytes"]
    result = {
        "command": "python benchmarks/kd_memory.py " + " ".join(sys.argv[1:]),
        "setup": {"vocab": args.vocab, "tokens": total, "rows": args.rows, "length": args.length,
                  "hidden": args.hidden, "chunk_size": args.chunk_size, "divergence": args.divergence,
                  "dtype": "float32", "torch": torch.__version__, "machine": platform.machine(),
                  "threads": torch.get_num_threads()},
        "runs": runs,
        "plain_fit": {"bytes_per_token": slope, "intercept_bytes": intercept,
                      "bytes_per_token_in_vocab_floats": slope / (4 * args.vocab)},
        "plain_full_bytes_extrapolated": plain_full,
        "chunked_full_bytes_measured": chunked_full,
        "ratio_chunked_over_plain": chunked_full / plain_full,
        "bound": 1 / 8,
        "meets_bound": chunked_full <= plain_full / 8,
        "equality_at_tokens": plain_sizes[-1],
        "equality": equality,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return 0 if result["meets_bound"] else 1


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [f"# Full-vocabulary KD loss + backward: peak memory, chunked vs plain", "",
             f"`{result['command']}`", "",
             f"{s['divergence']} over V = {s['vocab']:,}, hidden {s['hidden']}, {s['dtype']}, chunk {s['chunk_size']} "
             f"positions; torch {s['torch']}, {s['threads']} thread(s). Peak = highest live CPU tensor bytes "
             "(torch allocator events) during loss + backward, above the inputs.", "",
             "| N tokens | variant | peak GiB | seconds |", "|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['tokens']:,} | {r['variant']} | {r['peak_gib']:.3f} | {r['seconds']:.1f} |")
    fit = result["plain_fit"]
    lines += ["", f"Plain peak is linear in N: {fit['bytes_per_token'] / 2 ** 20:.2f} MiB per token "
              f"(= {fit['bytes_per_token_in_vocab_floats']:.2f} float32 vectors of length V).",
              f"At N = {s['tokens']:,} ({s['rows']} x {s['length']:,}): plain {result['plain_full_bytes_extrapolated'] / GiB:.1f} GiB "
              f"(extrapolated; it does not fit this machine), chunked {result['chunked_full_bytes_measured'] / GiB:.3f} GiB "
              f"(measured): ratio **{result['ratio_chunked_over_plain']:.4f}** (bound 1/8 = 0.125: "
              f"{'met' if result['meets_bound'] else 'NOT met'}).", "",
              f"Values and gradients at N = {result['equality_at_tokens']:,} (plain vs chunked, float32):", "",
              "| output | max abs diff | max abs value |", "|---|---|---|"]
    for key, value in result["equality"].items():
        lines.append(f"| {key} | {value['max_abs_diff']:.2e} | {value['max_abs']:.2e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
