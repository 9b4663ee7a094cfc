"""Paired difference between methods of two ``kdrl bench`` output directories.

``kdrl bench --pairs`` compares methods trained in one benchmark (one set of overrides). This
compares runs of two benchmarks, e.g. each method at its own best learning rate:

    python benchmarks/paired_across.py benchmarks/results/sums_5seeds:kdrl \
        benchmarks/results/sums_grpo_lr3e-4:grpo --seeds 5

Same statistic as ``kdrl bench``: per seed and problem, A's mean score minus B's, percentile
bootstrap over seeds and problems (kdrl.evaluate.paired_bootstrap).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from kdrl.bench import (BOOTSTRAP_REPLICATES, BOOTSTRAP_SEED, PAIRED_METRICS, paired_table, pairs_markdown,
                        per_problem)
from kdrl.evaluate import paired_bootstrap


def parse(item: str) -> tuple[Path, str]:
    folder, _, method = item.rpartition(":")
    if not folder or not method:
        raise SystemExit(f"expected DIR:METHOD, got {item!r}")
    return Path(folder), method


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="DIR:METHOD")
    ap.add_argument("b", help="DIR:METHOD")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args(argv)
    (dir_a, a), (dir_b, b) = parse(args.a), parse(args.b)
    seeds = range(args.seeds)
    records = {"a": {s: per_problem(dir_a, a, s) for s in seeds}, "b": {s: per_problem(dir_b, b, s) for s in seeds}}
    sets = sorted({name for by_seed in records.values() for sets in by_seed.values() for name in sets})
    rows = []
    for name in sets:
        for metric, key in PAIRED_METRICS.items():
            table = paired_table({s: r.get(name, []) for s, r in records["a"].items()},
                                 {s: r.get(name, []) for s, r in records["b"].items()}, key)
            if table:
                mean, low, high = paired_bootstrap(table, BOOTSTRAP_REPLICATES, BOOTSTRAP_SEED)
                rows.append({"a": f"{a} ({dir_a.name})", "b": f"{b} ({dir_b.name})", "set": name, "metric": metric,
                             "difference": mean, "low": low, "high": high, "seeds": len(table),
                             "problems": len(table[0])})
    print(pairs_markdown(rows))


if __name__ == "__main__":
    main()
