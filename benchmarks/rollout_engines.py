"""Rollout throughput of the hf and vllm engines on the same model and batch.

    python benchmarks/rollout_engines.py --engines hf vllm --out benchmarks/results/rollout_engines

The model is benchmarks/throughput.py's larger random Qwen2 student (about 23M parameters, head_dim
64, vocabulary 32,768; a random model almost never samples EOS, so every row is about
--max-new-tokens long and both engines do the same work). Each engine runs in a fresh process
(in-process vLLM changes its process), with the same torch threads, on the same prompts (the
bundled training problems) and sampling: one warm-up call, then the median of --repeats calls of
``engine.generate(prompts, G, T=1, top_p=1)``. For vllm, the time of one ``sync_weights`` too.

Engines can be measured by different interpreters (vLLM pins its own transformers): results are
merged into --out/results.json by engine name, and results.md is written from all of them.
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
sys.path.insert(0, str(REPO / "benchmarks"))


def measure(engine: str, args: argparse.Namespace) -> dict:
    import torch
    import transformers

    from kdrl.config import load_config
    from kdrl.rollout import SamplingParams
    from kdrl.build import build
    from throughput import build_larger_models

    with tempfile.TemporaryDirectory() as root:
        paths = build_larger_models(Path(root), vocab=32768)
        overrides = [f"model.student={paths['student']}", f"rollout.engine={engine}", "data.eval=[]",
                     f"train.cpu_threads={args.threads}", "log.progress=false", f"log.run_dir={Path(root) / 'run'}"]
        started = time.perf_counter()
        run = build(load_config(REPO / "recipes" / "grpo.yaml", overrides))
        build_seconds = time.perf_counter() - started
        problems = run.train_problems[:args.prompts]
        sampling = SamplingParams(1.0, 1.0, args.max_new_tokens)
        calls = []
        for repeat in range(args.repeats + 1):  # the first call is a warm-up
            started = time.perf_counter()
            rollouts = run.student_engine.generate(problems, args.group_size, sampling)
            seconds = time.perf_counter() - started
            if repeat:
                calls.append({"seconds": seconds, "tokens": float(rollouts.response_mask.sum())})
        result = {"engine": engine, "transformers": transformers.__version__, "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "student_params": paths["student_params"],
                  "setup_seconds": build_seconds, "rows": rollouts.num_rows,
                  "median_seconds": statistics.median(c["seconds"] for c in calls),
                  "mean_tokens": statistics.fmean(c["tokens"] for c in calls),
                  "tokens_per_second": statistics.median(c["tokens"] / c["seconds"] for c in calls)}
        if engine == "vllm":
            import vllm

            result["vllm"] = vllm.__version__
            started = time.perf_counter()
            run.student_engine.sync_weights(run.student)
            result["sync_seconds"] = time.perf_counter() - started
        return result


def table(results: dict) -> str:
    lines = ["| engine | tokens/s | s per generate | response tokens | rows | threads | sync s | versions |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(results.items()):
        sync = f"{r['sync_seconds']:.2f}" if "sync_seconds" in r else "-"
        versions = f"transformers {r['transformers']}" + (f", vllm {r['vllm']}" if "vllm" in r else "")
        lines.append(f"| {name} | {r['tokens_per_second']:.0f} | {r['median_seconds']:.2f} | {r['mean_tokens']:.0f} | "
                     f"{r['rows']} | {r['threads']} | {sync} | {versions} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both engines")
    parser.add_argument("--out", default="benchmarks/results/rollout_engines")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    settings = {k: getattr(args, k) for k in ("prompts", "group_size", "max_new_tokens", "repeats", "threads")}
    if saved and saved["settings"] != settings:
        parser.error(f"{path} holds results for other settings ({saved['settings']}); use another --out")
    results = saved.get("engines", {})
    for engine in args.engines:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            results[engine] = pool.apply(measure, (engine, args))
        print(json.dumps(results[engine]), flush=True)
    machine = {"platform": platform.platform(), "cpu_count": multiprocessing.cpu_count()}
    path.write_text(json.dumps({"settings": settings, "machine": machine, "engines": results}, indent=2) + "\n")
    (out / "results.md").write_text(table(results) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
