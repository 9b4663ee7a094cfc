"""How much of one batch's gradient is signal?  Cosine between gradients of independent batches.

At the bundled student's initial weights, each method's loss gradient is computed on several
independent rollout batches (different prompts, different samples; no optimizer step), and the
mean pairwise cosine between them is reported. Noise averages out between independent batches and
the shared direction does not, so a mean cosine near 0 means a batch's gradient is mostly noise
at that batch size (and an Adam step mostly a random step), a clearly positive one means batches
agree on where to go.

    python benchmarks/gradient_coherence.py --methods grpo kd_rkl kdrl --batches 6 \
        --out benchmarks/results/sums_5seeds/gradient_coherence.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import torch

from kdrl.build import build
from kdrl.config import load_config
from kdrl.trainer import accumulate_gradients, collect_batch

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def batch_gradient(run) -> torch.Tensor:
    """One rollout batch's loss gradient, flattened: the trainer's step up to the optimizer."""
    _, _, batch, _ = collect_batch(run, timings={})
    run.optimizer.zero_grad(set_to_none=True)
    accumulate_gradients(run, batch)
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in run.student.parameters() if p.requires_grad])


def coherence(method: str, batches: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        config = load_config(RECIPES / f"{method}.yaml", overrides + [f"log.run_dir={run_dir}", "data.eval=[]",
                                                                     "log.progress=false", "train.cpu_threads=1"])
        run = build(config, overwrite=True)
        grads = [batch_gradient(run) for _ in range(batches)]
        run.logger.close()
    cosines = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(grads, 2)]
    norms = [float(g.norm()) for g in grads]
    return {"method": method, "batches": batches, "mean_cosine": sum(cosines) / len(cosines),
            "min_cosine": min(cosines), "max_cosine": max(cosines), "mean_grad_norm": sum(norms) / len(norms)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=["grpo", "kd_rkl", "kdrl"])
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--out")
    ap.add_argument("overrides", nargs="*", default=["rollout.prompts_per_step=16"],
                    help="key=value overrides for every method (default: the comparison's batch)")
    args = ap.parse_args(argv)
    results = {"overrides": args.overrides, "rows": [coherence(m, args.batches, args.overrides) for m in args.methods]}
    for row in results["rows"]:
        print(f"{row['method']:12s} mean cosine {row['mean_cosine']:+.4f} "
              f"[{row['min_cosine']:+.4f}, {row['max_cosine']:+.4f}]  |g| {row['mean_grad_norm']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
