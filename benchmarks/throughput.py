"""Throughput and memory of GRPO and KDRL training steps, and the cost of the KD term.

    OMP_NUM_THREADS=1 python benchmarks/throughput.py --out benchmarks/results/throughput

Two configurations: the bundled models and task (16 prompts x 8), and a larger
one built here (randomly initialised Qwen2 student ~23M and teacher ~42M parameters, vocabulary
32,768, fixed-length responses). For each, in a fresh process per method:

- real ``training_step``s (after one warm-up step): per-phase seconds (generate, reward, teacher,
  train), response tokens per second, and the process's peak resident memory (VmHWM);
- the KD overhead, measured on IDENTICAL rollouts (so response lengths cannot differ between the
  methods): the time of ``teacher.score`` alone, and of the learning part of a step (teacher,
  prepare, update) for grpo and for kdrl, interleaved, medians over repeats.
  overhead = kdrl learning time - grpo learning time; the bound is overhead <= 1.15 x teacher time
  (the teacher forward is the only extra work KDRL should cost).
- when TRL is installed (``pip install -e ".[bench]"``): TRL's ``GRPOTrainer`` on the same student,
  prompts, reward and batch (benchmarks/vs_trl.py runs it), and the ratio of its median step to
  kdrl's grpo step; ``--no-trl`` skips it.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PHASES = ("generate", "reward", "teacher", "train")


def common_overrides(run_dir: Path) -> list[str]:
    return [f"log.run_dir={run_dir}", "log.progress=false", "log.plot=false", "log.sample_every=0",
            "eval.before=false", "data.eval=[]", "checkpoint.save_final=false", "train.steps=1000"]


def build_larger_models(root: Path, vocab: int) -> dict[str, str]:
    """Random Qwen2 student and teacher with a byte tokenizer widened to ``vocab`` entries (the
    extra entries are byte pairs: never produced by encoding, decodable when sampled)."""
    import torch
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    from kdrl.demo import EOS_TOKEN, PAD_TOKEN, make_model

    symbols = [bytes_to_unicode()[b] for b in range(256)]
    entries = [PAD_TOKEN, EOS_TOKEN] + symbols + [a + b for a in symbols for b in symbols]
    tokenizer = Qwen2Tokenizer(vocab={token: i for i, token in enumerate(entries[:vocab])}, merges=[], unk_token=None,
                               eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, clean_up_tokenization_spaces=False,
                               model_max_length=512)
    paths = {}
    for name, hidden, layers, heads, intermediate, seed in (("student", 384, 6, 6, 1024, 1),
                                                            ("teacher", 512, 8, 8, 1408, 2)):
        model = make_model(tokenizer, hidden_size=hidden, layers=layers, heads=heads, intermediate=intermediate,
                           seed=seed, max_position_embeddings=512)
        with torch.no_grad():  # a peaked output layer, so sampling is not uniform over 32k tokens
            model.model.embed_tokens.weight.mul_(5.0)
        model.save_pretrained(root / name, safe_serialization=True)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
        paths[f"{name}_params"] = sum(p.numel() for p in model.parameters())
    return paths


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_steps(recipe: str, overrides: list[str], steps: int) -> dict:
    """Real training steps of one method (in its own process: the peak memory is this method's)."""
    import torch

    from kdrl.config import load_config
    from kdrl.build import build
    from kdrl.trainer import training_step

    run = build(load_config(REPO / "recipes" / f"{recipe}.yaml", overrides))
    training_step(run)  # warm-up
    records = []
    for _ in range(steps):
        started = time.perf_counter()
        metrics = training_step(run)
        records.append({**{f"time_{p}": metrics.get(f"time_{p}", 0.0) for p in PHASES},
                        "step_seconds": time.perf_counter() - started,
                        "tokens": float(metrics["_rollouts"].response_mask.sum())})
    median = {key: statistics.median(r[key] for r in records) for key in records[0]}
    tokens = sum(r["tokens"] for r in records)
    return {"method": recipe, "steps": steps, "median": median,
            "tokens_per_second": tokens / sum(r["step_seconds"] for r in records),
            "peak_rss_gib": peak_rss_bytes() / 2 ** 30, "threads": torch.get_num_threads()}


def measure_overhead(overrides: list[str], repeats: int) -> dict:
    """Teacher time alone, and the learning part of a step for grpo and kdrl on the same rollouts."""
    from kdrl.config import load_config
    from kdrl.rollout import SamplingParams
    from kdrl.build import build
    from kdrl.rollout.rows import score_rewards
    from kdrl.trainer import make_batch, update

    def own_run_dir(method: str) -> list[str]:
        return [f"{o}-{method}" if o.startswith("log.run_dir=") else o for o in overrides]

    runs = {method: build(load_config(REPO / "recipes" / f"{method}.yaml", own_run_dir(method)))
            for method in ("grpo", "kdrl")}
    config = runs["kdrl"].config
    sampling = SamplingParams(config.rollout.temperature, config.rollout.top_p, config.rollout.max_new_tokens)

    def learn(run, rollouts) -> float:
        started = time.perf_counter()
        rewards = score_rewards(run.reward_fn, rollouts)
        teacher = run.teacher_scorer.score(rollouts, need_hidden=run.objective.needs_teacher_hidden) \
            if run.objective.needs_teacher else None
        batch = run.objective.prepare(make_batch(rollouts, rewards, teacher, None), run.step)
        update(run, batch)
        return time.perf_counter() - started

    times = {"generate": [], "teacher_alone": [], "grpo_learn": [], "kdrl_learn": []}
    problems = runs["grpo"].train_problems
    for repeat in range(repeats + 1):  # the first is a warm-up
        batch_problems = [problems[(repeat * config.rollout.prompts_per_step + i) % len(problems)]
                          for i in range(config.rollout.prompts_per_step)]
        started = time.perf_counter()
        rollouts = runs["grpo"].sampling_source.generate(batch_problems, config.rollout.group_size, sampling)
        generate = time.perf_counter() - started
        started = time.perf_counter()
        runs["kdrl"].teacher_scorer.score(rollouts)
        teacher = time.perf_counter() - started
        order = ("grpo", "kdrl") if repeat % 2 == 0 else ("kdrl", "grpo")  # interleaved against drift
        learned = {method: learn(runs[method], rollouts) for method in order}
        if repeat == 0:
            continue
        for key, value in (("generate", generate), ("teacher_alone", teacher), ("grpo_learn", learned["grpo"]),
                           ("kdrl_learn", learned["kdrl"])):
            times[key].append(value)
    median = {key: statistics.median(values) for key, values in times.items()}
    overhead = median["kdrl_learn"] - median["grpo_learn"]
    return {"repeats": repeats, "median_seconds": median, "all_seconds": times, "kd_overhead_seconds": overhead,
            "overhead_over_teacher": overhead / median["teacher_alone"],
            "meets_bound": overhead <= 1.15 * median["teacher_alone"]}


def measure_trl_grpo(student: str, data: str, prompts: int, group: int, max_new_tokens: int, steps: int) -> dict:
    """Median step of TRL's GRPOTrainer on the same work as kdrl's grpo here (one warm-up step)."""
    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import vs_trl

    spec = {"kind": "grpo", "prompts": prompts, "group": group, "max_new_tokens": max_new_tokens, "reward": "math"}
    with tempfile.TemporaryDirectory() as work:
        ends, _ = vs_trl.run_trl(spec, {"student": student, "data": data}, Path(work), steps + 1)
    return {"median_step_seconds": statistics.median(b - a for a, b in zip(ends, ends[1:])), "steps": steps,
            "threads": torch.get_num_threads()}


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def in_fresh_process(fn, *args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/throughput")
    parser.add_argument("--steps", type=int, default=3, help="measured training steps per method")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the same-rollouts overhead measurement")
    parser.add_argument("--vocab", type=int, default=32_768, help="vocabulary of the larger configuration")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL GRPOTrainer comparison")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        larger = build_larger_models(root / "models", args.vocab)
        configs = {
            "bundled": {"description": "bundled student 0.58M / teacher 2.4M, vocab 258; 16 prompts x 8, "
                                       "up to 64 tokens (twice the default run's batch)",
                        "overrides": ["rollout.prompts_per_step=16"],
                        "trl": (str(REPO / "kdrl/assets/demo/student"), str(REPO / "kdrl/assets/demo/data/train.jsonl"),
                                16, 8, 64)},
            "larger": {"description": f"random Qwen2 student {larger['student_params'] / 1e6:.1f}M / teacher "
                                      f"{larger['teacher_params'] / 1e6:.1f}M, vocab {args.vocab:,}; 4 prompts x 4, "
                                      "32 tokens",
                       "overrides": [f"model.student={larger['student']}", f"model.teacher={larger['teacher']}",
                                     "rollout.prompts_per_step=4", "rollout.group_size=4",
                                     "rollout.max_new_tokens=32", "train.micro_batch_size=16"],
                       "trl": (larger["student"], str(REPO / "kdrl/assets/demo/data/train.jsonl"), 4, 4, 32)},
        }
        results = {"command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
                   "machine": {"platform": platform.platform(), "processor": platform.machine(),
                               "cpu_count": multiprocessing.cpu_count()},
                   "configs": {}}
        for name, spec in configs.items():
            entry = {"description": spec["description"], "methods": {}}
            for method in ("grpo", "kdrl"):
                overrides = spec["overrides"] + common_overrides(root / f"run-{name}-{method}")
                if method == "grpo":
                    overrides = [o for o in overrides if not o.startswith("model.teacher")]
                entry["methods"][method] = in_fresh_process(measure_steps, method, overrides, args.steps)
                print(name, json.dumps(entry["methods"][method]), flush=True)
            entry["overhead"] = in_fresh_process(measure_overhead,
                                                 spec["overrides"] + common_overrides(root / f"run-{name}-kd"),
                                                 args.repeats)
            print(name, json.dumps(entry["overhead"]["median_seconds"]),
                  f"overhead/teacher = {entry['overhead']['overhead_over_teacher']:.3f}", flush=True)
            if not args.no_trl and trl_available():
                entry["trl_grpo"] = in_fresh_process(measure_trl_grpo, *spec["trl"], args.steps)
                entry["trl_over_kdrl_grpo"] = (entry["trl_grpo"]["median_step_seconds"]
                                               / entry["methods"]["grpo"]["median"]["step_seconds"])
                print(name, "TRL GRPOTrainer / kdrl grpo step:", f"{entry['trl_over_kdrl_grpo']:.2f}", flush=True)
            results["configs"][name] = entry
    results["wall_seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results) + "\n")
    print(markdown(results))
    return 0 if all(c["overhead"]["meets_bound"] for c in results["configs"].values()) else 1


def markdown(results: dict) -> str:
    lines = ["# Throughput and memory: grpo vs kdrl training steps", "", f"`{results['command']}` "
             f"({results['wall_seconds']:.0f} s; {results['machine']['cpu_count']} CPUs, one torch thread)", "",
             "| config | method | generate s | reward s | teacher s | train s | step s | tokens/s | peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results["configs"].items():
        for method, r in entry["methods"].items():
            m = r["median"]
            lines.append(f"| {name} | {method} | {m['time_generate']:.3f} | {m['time_reward']:.3f} | "
                         f"{m['time_teacher']:.3f} | {m['time_train']:.3f} | {m['step_seconds']:.3f} | "
                         f"{r['tokens_per_second']:.0f} | {r['peak_rss_gib']:.2f} |")
    lines += ["", "Medians over the measured steps (after one warm-up). Real steps sample different rollouts "
              "per method, so their step times also differ by response lengths, and each method ran in its own "
              "process at a different time on a machine shared with other jobs (a phase both methods share, "
              "like generate, shows that noise). The KD cost is therefore measured on identical rollouts, "
              "grpo and kdrl interleaved in one process:", "",
              "| config | teacher alone s | grpo learn s | kdrl learn s | KD overhead s | overhead / teacher | "
              "bound 1.15 |", "|---|---|---|---|---|---|---|"]
    for name, entry in results["configs"].items():
        o, m = entry["overhead"], entry["overhead"]["median_seconds"]
        lines.append(f"| {name} | {m['teacher_alone']:.3f} | {m['grpo_learn']:.3f} | {m['kdrl_learn']:.3f} | "
                     f"{o['kd_overhead_seconds']:.3f} | {o['overhead_over_teacher']:.2f} | "
                     f"{'met' if o['meets_bound'] else 'NOT met'} |")
    trl_entries = {name: entry for name, entry in results["configs"].items() if "trl_grpo" in entry}
    if trl_entries:
        lines += ["", "The same grpo work in TRL's GRPOTrainer (same student, prompts, reward, batch; fp32, no "
                  "gradient checkpointing; benchmarks/vs_trl.py has the alternated comparison):", "",
                  "| config | TRL step s | kdrl grpo step s | TRL / kdrl |", "|---|---|---|---|"]
        for name, entry in trl_entries.items():
            lines.append(f"| {name} | {entry['trl_grpo']['median_step_seconds']:.3f} | "
                         f"{entry['methods']['grpo']['median']['step_seconds']:.3f} | "
                         f"{entry['trl_over_kdrl_grpo']:.2f}x |")
    for name, entry in results["configs"].items():
        lines.append(f"\n- {name}: {entry['description']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
