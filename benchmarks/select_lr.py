"""Pick each method's learning rate from ``kdrl bench`` runs at several rates, on problems the table never scores.

The comparison gives every method the same tuning: the same grid of learning rates, scored the
same way. The score is avg@k at temperature 1 of a seed's final checkpoint on a selection split:
the bundled test_id rows after the first ``eval.num_problems`` (200), which every benchmark table
leaves out, so the choice never sees a problem the table reports. The mean rollout reward over
the last training steps is shown beside it (for sft it is the reward of the dataset's solutions,
not the student's):

    python benchmarks/select_lr.py benchmarks/results/sums_5seeds benchmarks/results/sums_lr1e-4_seed0 \
        benchmarks/results/sums_grpo_lr2e-4 benchmarks/results/sums_grpo_lr3e-4 --seed 0 \
        --out benchmarks/results/sums_lr_select/table.md

Each DIR is a benchmark output folder; a run's learning rate is read from its config.yaml, and a
method is scored at every rate where a finished run of that seed exists.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from kdrl.cli import main as kdrl_main
from kdrl.config import Config, load_config
from kdrl.data import resolve_data_path
from kdrl.logger import read_metrics


def selection_split(path: Path, scored_rows: int) -> None:
    """The bundled test_id rows after the first ``scored_rows`` (the ones a table scores), as they are."""
    rows = resolve_data_path("bundled:test_id").read_text().splitlines(keepends=True)
    path.write_text("".join(rows[scored_rows:]))


def selection_accuracy(runs: dict[str, Path], scored_rows: int, samples: int, seed: int) -> dict[str, float]:
    """avg@k at temperature 1 of each run's final checkpoint on the selection split (kdrl eval)."""
    with tempfile.TemporaryDirectory() as tmp:
        split, out = Path(tmp) / "select.jsonl", Path(tmp) / "eval.json"
        selection_split(split, scored_rows)
        models = [arg for label, run in runs.items() for arg in ("--model", f"{label}={run / 'final'}")]
        kdrl_main(["eval", *models, "--data", str(split), "--samples", str(samples), "--temperature", "1.0",
                   "--seed", str(seed), "--out", str(out)])
        results = json.loads(out.read_text())
    return {label: results[label]["select"]["accuracy"] for label in runs}


def tail_reward(run: Path, last: int) -> float:
    rewards = [r["reward"] for r in read_metrics(run) if r.get("kind") == "train"]
    if not rewards:
        raise SystemExit(f"{run}: no training steps in metrics.jsonl")
    return sum(rewards[-last:]) / len(rewards[-last:])


def rate_label(rate: float) -> str:
    """1e-4, 1.5e-4, 3e-4: the mantissa without trailing zeros."""
    mantissa, exponent = f"{rate:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def collect(folders: list[Path], seed: int) -> tuple[dict[str, dict[str, Path]], int]:
    """{method: {rate: run directory}} for the finished runs of ``seed``, the rate from each run's
    own config.yaml, and the most test_id rows any of them scored (eval.num_problems)."""
    runs: dict[str, dict[str, Path]] = {}
    scored_rows = 0
    for folder in folders:
        for run in sorted((folder / "runs").glob(f"*-seed{seed}")):
            if not (run / "summary.json").is_file():
                continue
            config: Config = load_config(run / "config.yaml")
            scored_rows = max(scored_rows, config.eval.num_problems)
            rate = rate_label(config.train.learning_rate)
            method = run.name.rsplit("-seed", 1)[0]
            if rate in runs.get(method, {}):
                raise SystemExit(f"{method} at learning rate {rate}: two runs ({runs[method][rate]} and {run})")
            runs.setdefault(method, {})[rate] = run
    return runs, scored_rows


def markdown(scores: dict[str, dict[str, dict[str, float]]], seed: int, last: int, samples: int, scored_rows: int,
             command: str) -> str:
    rates = sorted({rate for by_rate in scores.values() for rate in by_rate}, key=float)
    lines = [f"| method | {' | '.join(f'selection avg@{samples} at lr {r}' for r in rates)} | "
             f"{' | '.join(f'last-{last}-step reward at lr {r}' for r in rates)} | chosen |",
             "|---|" + "---|" * (2 * len(rates) + 1)]
    for method, by_rate in sorted(scores.items()):
        best = max(by_rate, key=lambda r: by_rate[r]["selection"])
        accuracy = [(f"**{by_rate[r]['selection']:.3f}**" if r == best else f"{by_rate[r]['selection']:.3f}")
                    if r in by_rate else "-" for r in rates]
        reward = [f"{by_rate[r]['reward']:.3f}" if r in by_rate else "-" for r in rates]
        lines.append(f"| {method} | {' | '.join(accuracy)} | {' | '.join(reward)} | {best} |")
    lines += ["", f"Seed {seed}'s final checkpoints; selection avg@{samples} at temperature 1 on bundled test_id "
                  f"rows from {scored_rows} on, which no benchmark table scores (they score rows 0-{scored_rows - 1}); "
                  f"the reward is the mean rollout reward of the last {last} training steps (for sft, the "
                  f"dataset solutions' reward). Command: `{command}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, metavar="DIR")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--last", type=int, default=40, help="training steps averaged at the end of each run")
    ap.add_argument("--samples", type=int, default=4, help="samples per selection problem (avg@k)")
    ap.add_argument("--out", help="write the table here (and the scores as JSON beside it)")
    args = ap.parse_args(argv)
    runs, scored_rows = collect(args.folders, args.seed)
    labels = {f"{method}@{rate}": run for method, by_rate in runs.items() for rate, run in by_rate.items()}
    accuracy = selection_accuracy(labels, scored_rows, args.samples, args.seed)
    scores = {method: {rate: {"selection": accuracy[f"{method}@{rate}"], "reward": tail_reward(run, args.last)}
                       for rate, run in by_rate.items()} for method, by_rate in runs.items()}
    command = ("python benchmarks/select_lr.py " + " ".join(map(str, args.folders)) +
               f" --seed {args.seed} --last {args.last} --samples {args.samples}")
    table = markdown(scores, args.seed, args.last, args.samples, scored_rows,
                     command + (f" --out {args.out}" if args.out else ""))
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(scores, indent=2) + "\n")


if __name__ == "__main__":
    main()
