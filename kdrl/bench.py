"""Method comparison on one budget: train each preset over several seeds from the same student,
then tabulate held-out avg@k / pass@k, chain correctness, response length, wall time and steps to
a target accuracy, and for given method pairs the paired difference with a 95% bootstrap interval
over problems and seeds (from each run's per-problem results, eval_after_problems.json).

    kdrl bench --methods grpo kdrl kd_rkl --seeds 3 --pairs kdrl:kd_rkl kdrl:grpo --out benchmarks/results/methods

Every method gets the same prompts per step, rollouts per prompt, steps and evaluation; only the
recipe's objective section differs (plus per-method overrides given with --method-override).
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any, Optional

from kdrl.config import ConfigError, load_config, to_dict
from kdrl.evaluate import EVAL_PROBLEMS_FILE, paired_bootstrap
from kdrl.logger import read_metrics
from kdrl.trainer import train

# the key comparisons of issue 16 (A − B), used when --pairs is not given and both methods ran
DEFAULT_PAIRS = [("kdrl", "kd_rkl"), ("kdrl", "grpo"), ("kd_then_rl", "kdrl")]
PAIRED_METRICS = {"accuracy": "correct", "chain_correct": "chain_correct"}  # table name -> per-problem key
BOOTSTRAP_REPLICATES, BOOTSTRAP_SEED = 10_000, 0


def run_benchmark(methods: list[str], seeds: list[int], out_dir: Path, overrides: list[str],
                  method_overrides: dict[str, list[str]], target_accuracy: float, command: str,
                  recipes_dir: Path = Path("recipes"), jobs: int = 1,
                  method_pairs: Optional[list[tuple[str, str]]] = None) -> dict:
    """Train every (method, seed) pair; ``jobs`` > 1 runs that many at once in separate processes
    (each run's own wall time then includes the sharing of the machine: say so when reporting).
    ``method_pairs``: (A, B) compared problem by problem (default: DEFAULT_PAIRS among ``methods``)."""
    if method_pairs is None:
        method_pairs = [pair for pair in DEFAULT_PAIRS if set(pair) <= set(methods)]
    missing = sorted({m for pair in method_pairs for m in pair} - set(methods))
    if missing:
        raise ConfigError(f"--pairs names {', '.join(missing)}, not among --methods")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    # seed-major: an interrupted benchmark has every method at the seeds it finished
    pairs = [(method, seed) for seed in seeds for method in methods]
    # Configs are loaded here, in the parent, so a bad recipe or override fails before any run starts.
    configs = {(method, seed): load_config(recipes_dir / f"{method}.yaml",
                                           overrides + method_overrides.get(method, []) +
                                           [f"train.seed={seed}", f"log.run_dir={run_dir(out_dir, method, seed)}",
                                            "log.progress=false"])
               for method, seed in pairs}
    todo = [pair for pair in pairs if not (run_dir(out_dir, *pair) / "summary.json").is_file()]
    for pair in pairs:  # a finished run is reused only if it was trained with this invocation's config
        if pair not in todo:
            check_finished_run(run_dir(out_dir, *pair), configs[pair])
    if jobs > 1 and len(todo) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in [pool.submit(train_one, configs[pair]) for pair in todo]:
                future.result()  # re-raises a failed run's error here
    else:
        for pair in todo:
            train_one(configs[pair])
    runs: dict[str, list[dict]] = {}
    for method, seed in pairs:  # finished runs are read back: the benchmark can be resumed
        directory = run_dir(out_dir, method, seed)
        summary = json.loads((directory / "summary.json").read_text())
        summary["curve"] = [r for r in read_metrics(directory) if r.get("kind") == "eval"]
        runs.setdefault(method, []).append(summary)
    results = {"methods": methods, "seeds": seeds, "target_accuracy": target_accuracy, "command": command,
               "overrides": overrides, "method_overrides": method_overrides, "jobs": jobs,
               "total_seconds": time.perf_counter() - started, "rows": table_rows(runs, target_accuracy),
               "pairs": paired_rows(out_dir, method_pairs, seeds)}
    compared = {(r["a"], r["b"]) for r in results["pairs"]}
    results["pairs_without_problems"] = [f"{a}:{b}" for a, b in method_pairs if (a, b) not in compared]
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "table.md").write_text(markdown(results) + "\n")
    plot_curves(runs, out_dir / "curves.png")
    return results


def run_dir(out_dir: Path, method: str, seed: int) -> Path:
    return out_dir / "runs" / f"{method}-seed{seed}"


def config_differences(saved: Any, wanted: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        return [key for name in sorted(set(saved) | set(wanted))
                for key in config_differences(saved.get(name), wanted.get(name), f"{prefix}{name}.")]
    return [] if saved == wanted else [prefix.rstrip(".")]


def check_finished_run(directory: Path, config) -> None:
    """Refuse to read back a finished run whose config.yaml is not the one asked for now (another
    learning rate, step count, recipe...): its numbers would enter the table under the wrong setting."""
    saved = directory / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"{directory} holds a finished run without its config.yaml; delete that run directory "
                          f"to retrain it")
    # read as --resume reads it; where the run lives is not a setting of it (a results folder can move)
    differing = [key for key in config_differences(to_dict(load_config(saved)), to_dict(config))
                 if key != "log.run_dir"]
    if differing:
        shown = ", ".join(differing[:5]) + (f" and {len(differing) - 5} more" if len(differing) > 5 else "")
        raise ConfigError(f"{directory} holds a finished run with a different config ({shown}); "
                          f"give another --out, or delete that run directory to retrain it")


def train_one(config) -> None:
    """One benchmark run; its summary.json (with the run's wall time) marks it finished. A run
    directory without one is a run killed part way: it is cleared and the run starts again."""
    started = time.perf_counter()
    summary = train(config, overwrite=True)
    summary["wall_seconds"] = time.perf_counter() - started
    (Path(config.log.run_dir) / "summary.json").write_text(json.dumps(summary, indent=2))


def steps_to_reach(curve: list[dict], set_name: str, target: float) -> Optional[int]:
    for record in curve:
        if record.get(f"{set_name}/accuracy", -1) >= target:
            return record["step"]
    return None


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table_rows(runs: dict[str, list[dict]], target: float) -> list[dict]:
    rows = []
    for method, summaries in runs.items():
        row: dict = {"method": method, "seeds": len(summaries)}
        sets = sorted({k.split("/")[0] for s in summaries for k in s["after"] if k.endswith("/accuracy")})
        for name in sets:
            samples = max(int(s["after"].get(f"{name}/samples", 1)) for s in summaries)
            # avg@k, pass@k at the largest k (pass@1 is avg@k again), maj@k, mean response length
            keys = sorted({k.split("/", 1)[1] for s in summaries for k in s["after"]
                           if k in (f"{name}/accuracy", f"{name}/pass@{samples}", f"{name}/maj@{samples}",
                                    f"{name}/chain_correct", f"{name}/response_length")})
            for key in keys:
                row[f"{name}/{key}"] = _mean_std([s["after"][f"{name}/{key}"] for s in summaries
                                                  if f"{name}/{key}" in s["after"]])
            reached = [steps_to_reach(s["curve"], name, target) for s in summaries]
            row[f"{name}/steps_to_target"] = (sum(r is not None for r in reached),
                                              [r for r in reached])
        row["wall_seconds"] = _mean_std([s.get("wall_seconds", s.get("train_seconds", 0.0)) for s in summaries])
        before = summaries[0].get("before") or {}
        row["before"] = {k: v for k, v in before.items()
                         if k.endswith(("/accuracy", "/chain_correct", "response_length"))}
        rows.append(row)
    return rows


def markdown(results: dict) -> str:
    rows = results["rows"]
    metric_keys = [k for k in rows[0] if isinstance(rows[0][k], (list, tuple)) and "/" in k
                   and not k.endswith("steps_to_target")] if rows else []
    target = results["target_accuracy"]
    step_keys = [k for k in rows[0] if k.endswith("steps_to_target")] if rows else []
    header = ["method"] + metric_keys + [f"{k.split('/')[0]} steps to {target:.0%}" for k in step_keys] + \
        ["wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    if rows and rows[0]["before"]:
        start = rows[0]["before"]
        cells = ["initial student"] + [f"{start[k]:.3f}" if k in start else "" for k in metric_keys] + \
            [""] * len(step_keys) + [""]
        lines.append("| " + " | ".join(cells) + " |")
    method_overrides = results.get("method_overrides") or {}
    for row in rows:  # a method trained with its own overrides says so in its row
        extra = method_overrides.get(row["method"], [])
        cells = [row["method"] + (f" ({', '.join(extra)})" if extra else "")]
        for key in metric_keys:
            mean, std = row[key]
            cells.append(f"{mean:.3f} ± {std:.3f}" if not key.endswith("length") else f"{mean:.1f} ± {std:.1f}")
        for key in step_keys:
            count, steps = row[key]
            reached = [s for s in steps if s is not None]
            cells.append(f"{statistics.fmean(reached):.0f} ({count}/{len(steps)} seeds)" if reached
                         else f"not reached (0/{len(steps)})")
        mean, std = row["wall_seconds"]
        cells.append(f"{mean:.0f} ± {std:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = ", ".join(map(str, results["seeds"]))
    run_minutes = sum(mean * row["seeds"] for row in rows for mean in [row["wall_seconds"][0]]) / 60
    lines += ["", f"Mean ± standard deviation over seeds {seeds}; accuracy is avg@k, the mean over k samples per "
                  f"problem. Command: `{results['command']}`. This invocation: {results['total_seconds'] / 60:.1f} "
                  f"min with {results['jobs']} run(s) at once; the runs' own wall times sum to {run_minutes:.1f} min "
                  "(finished runs found in the output directory are read back, not retrained)."]
    if results.get("pairs"):
        lines += ["", pairs_markdown(results["pairs"])]
    if results.get("pairs_without_problems"):
        lines += ["", f"Not compared (no per-problem results, {EVAL_PROBLEMS_FILE}, in their runs): "
                      f"{', '.join(results['pairs_without_problems'])}."]
    return "\n".join(lines)


def per_problem(out_dir: Path, method: str, seed: int) -> dict[str, list[dict]]:
    path = run_dir(out_dir, method, seed) / EVAL_PROBLEMS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def paired_table(a: dict[int, list[dict]], b: dict[int, list[dict]], key: str) -> list[list[float]]:
    """d[s][p] = A's minus B's mean score on problem p in seed s, over the problems every seed of
    both methods scored (matched by id, in A's first seed's order)."""
    def scores(records: list[dict]) -> dict[str, float]:
        return {r["id"]: statistics.fmean(r[key]) for r in records if r.get(key)}

    a_scores = {seed: scores(records) for seed, records in a.items()}
    b_scores = {seed: scores(records) for seed, records in b.items()}
    seeds = sorted(set(a_scores) & set(b_scores))
    if not seeds:
        return []
    ids = [i for i in a_scores[seeds[0]] if all(i in a_scores[s] and i in b_scores[s] for s in seeds)]
    return [[a_scores[s][i] - b_scores[s][i] for i in ids] for s in seeds] if ids else []


def paired_rows(out_dir: Path, pairs: list[tuple[str, str]], seeds: list[int]) -> list[dict]:
    """One row per (pair, eval set, metric): the mean difference A − B and its 95% interval."""
    rows = []
    for a, b in pairs:
        records = {m: {s: per_problem(out_dir, m, s) for s in seeds} for m in (a, b)}
        sets = sorted({name for by_seed in records.values() for sets in by_seed.values() for name in sets})
        for name in sets:
            for metric, key in PAIRED_METRICS.items():
                table = paired_table({s: r.get(name, []) for s, r in records[a].items()},
                                     {s: r.get(name, []) for s, r in records[b].items()}, key)
                if not table:
                    continue
                mean, low, high = paired_bootstrap(table, BOOTSTRAP_REPLICATES, BOOTSTRAP_SEED)
                rows.append({"a": a, "b": b, "set": name, "metric": metric, "difference": mean, "low": low,
                             "high": high, "seeds": len(table), "problems": len(table[0])})
    return rows


def pairs_markdown(rows: list[dict]) -> str:
    lines = ["| A − B | set | metric | difference | 95% interval | seeds × problems |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['a']} − {r['b']} | {r['set']} | {r['metric']} | {100 * r['difference']:+.1f} | "
                     f"[{100 * r['low']:+.1f}, {100 * r['high']:+.1f}] | {r['seeds']} × {r['problems']} |")
    return "\n".join(lines + ["", f"Points (percentage); paired by seed and problem; percentile bootstrap over "
                                  f"seeds and problems resampled independently ({BOOTSTRAP_REPLICATES} replicates, "
                                  f"resampling seed {BOOTSTRAP_SEED}). An interval that contains 0 does not tell "
                                  "the two methods apart."])


def plot_curves(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({k.split("/")[0] for summaries in runs.values() for s in summaries for r in s["curve"]
                   for k in r if k.endswith("/accuracy")})
    panels = [(name, "accuracy") for name in sets] + [(sets[0], "response_length")] if sets else []
    figure, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 3.6))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for axis, (name, key) in zip(axes, panels):
        for method, summaries in runs.items():
            by_step: dict[int, list[float]] = {}
            for summary in summaries:
                for record in summary["curve"]:
                    if f"{name}/{key}" in record:
                        by_step.setdefault(record["step"], []).append(record[f"{name}/{key}"])
            steps = sorted(by_step)
            axis.plot(steps, [statistics.fmean(by_step[s]) for s in steps], marker=".", label=method)
        axis.set_title(f"{name} {key.replace('_', ' ')}", fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    if panels:
        axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
