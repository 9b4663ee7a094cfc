"""kdrl vs TRL on the same work: per-step cost of GRPO and on-policy reverse-KL distillation.

    pip install torch==2.13.0 -e ".[bench]"      # TRL is a benchmark-only extra
    python benchmarks/vs_trl.py --out benchmarks/results/vs_trl

Both systems get the same random-init Qwen2 models (written to a temporary directory by this
script, vocabulary 64), the same prompts (2-digit sums), the same reward (character-sum parity of
the response text, which marks about half the responses correct) and the same batch: TRL's
``GRPOTrainer`` against kdrl's ``grpo`` recipe, TRL's ``DistillationTrainer`` (beta 1: reverse KL,
fully on-policy) against kdrl's ``kd_rkl``. Each (system, configuration, round) runs in a fresh
process; the rounds alternate the systems so that a busy machine slows both alike. The per-step cost
is (time at the end of the last step - time at the end of the warm-up steps) / steps measured, so
start-up (imports, model loading, the first steps' allocations) is excluded.

TRL runs in fp32 without gradient checkpointing (its defaults are bf16 and checkpointing, both
slower here and a different computation from kdrl's fp32), once with torch's default thread count and
once with one thread; the ratio is taken against the faster of the two. kdrl runs with its own
defaults (``train.cpu_threads=0``: its measured thread policy).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]

# name -> the work: models, batch, response length, and which trainers compare
CONFIGS = {
    "grpo": dict(kind="grpo", student=dict(hidden=128, layers=4, heads=4, intermediate=512),
                 prompts=8, group=8, max_new_tokens=48, warmup=2, steps=12),
    "kd_rkl": dict(kind="kd_rkl", student=dict(hidden=128, layers=4, heads=4, intermediate=512),
                   teacher=dict(hidden=256, layers=6, heads=8, intermediate=1024),
                   prompts=64, group=1, max_new_tokens=48, warmup=2, steps=12),
    # larger: a 25M student whose sharpened output layer never ends early (EOS logit 0), so every
    # response is 256 tokens
    "grpo_large": dict(kind="grpo", student=dict(hidden=512, layers=8, heads=8, intermediate=1408, sharpen=7.0),
                       prompts=4, group=4, max_new_tokens=256, warmup=1, steps=3, rounds=2),
}
VOCAB_BYTES = [10] + list(range(32, 93))  # newline, space .. ']' : digits, '+', '=', upper case


def char_parity(problem, response: str) -> float:
    """The reward both systems use: 1 when the response's character codes sum to an odd number."""
    return float(sum(map(ord, response)) % 2)


def trl_char_parity(prompts, completions, **kwargs) -> list[float]:
    return [char_parity(None, text) for text in completions]


def trl_kdrl_math(prompts, completions, answer, **kwargs) -> list[float]:
    """kdrl's default reward (``math``), for TRL runs on kdrl's own task (benchmarks/throughput.py)."""
    from kdrl.rewards import get_reward
    from kdrl.types import Problem

    reward = get_reward("math")
    return [float(reward(Problem(id="", prompt=p, answer=a), text)) for p, a, text in zip(prompts, answer, completions)]


# ----------------------------------------------------------------------------- assets

def build_tokenizer():
    """A byte-level Qwen2 tokenizer of 64 tokens: pad, eos and 62 byte symbols (what the prompts use)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    symbols = bytes_to_unicode()
    vocab = {"<|pad|>": 0, "<|eos|>": 1}
    for b in VOCAB_BYTES:
        vocab[symbols[b]] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|eos|>", pad_token="<|pad|>",
                          clean_up_tokenization_spaces=False, model_max_length=512)


def build_model(tokenizer, hidden: int, layers: int, heads: int, intermediate: int, seed: int,
                sharpen: float = 0.0):
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512, tie_word_embeddings=not sharpen,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id, use_cache=True)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    if sharpen:  # logits of std ~3 against an EOS logit of 0: EOS is sampled about once in 5,000 tokens
        with torch.no_grad():
            model.lm_head.weight.mul_(sharpen)
            model.lm_head.weight[tokenizer.eos_token_id] = 0.0
            model.lm_head.weight[tokenizer.pad_token_id] = 0.0
    model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               bos_token_id=tokenizer.eos_token_id)
    return model


def build_assets(root: Path, name: str) -> dict:
    import random

    spec = CONFIGS[name]
    tokenizer = build_tokenizer()
    paths = {}
    for role, seed in (("student", 1), ("teacher", 2)):
        if role in spec:
            model = build_model(tokenizer, seed=seed, **spec[role])
            model.save_pretrained(root / name / role)
            tokenizer.save_pretrained(root / name / role)
            paths[role] = str(root / name / role)
            paths[f"{role}_params"] = sum(p.numel() for p in model.parameters())
    rng = random.Random(0)
    rows = []
    for index in range(512):
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        rows.append({"id": str(index), "prompt": f"{a}+{b}=", "answer": str(a + b)})
    data = root / name / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    paths["data"] = str(data)
    return paths


# ----------------------------------------------------------------------------- one measured run

class StepClock:
    def __init__(self):
        self.ends: list[float] = []


def run_kdrl(spec: dict, paths: dict, work: Path, steps: int, last_step_context=contextlib.nullcontext
             ) -> list[float]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the reward, as module:function
    from kdrl.build import build
    from kdrl.config import load_config
    from kdrl.trainer import training_step

    overrides = [f"model.student={paths['student']}", f"data.train={paths['data']}", "data.eval=[]",
                 f"rollout.prompts_per_step={spec['prompts']}", f"rollout.group_size={spec['group']}",
                 f"rollout.max_new_tokens={spec['max_new_tokens']}", f"train.steps={steps}",
                 "train.learning_rate=1e-5", "train.warmup_steps=0", f"train.micro_batch_size={spec['prompts'] * spec['group']}",
                 "eval.before=false", "log.progress=false", "log.plot=false", f"log.run_dir={work / 'kdrl'}",
                 "checkpoint.every=0", "checkpoint.save_final=false",
                 "reward.functions=[vs_trl:char_parity]", "reward.correct_threshold=1.0"]
    if "teacher" in paths:
        overrides.append(f"model.teacher={paths['teacher']}")
    run = build(load_config(REPO / "recipes" / f"{spec['kind']}.yaml", overrides))
    ends, phases = [], []
    for index in range(steps):
        with last_step_context() if index == steps - 1 else contextlib.nullcontext():
            metrics = training_step(run)
        ends.append(time.perf_counter())
        phases.append({k: v for k, v in metrics.items() if k.startswith("time_") or k == "response_length"})
    run.logger.close()
    return ends, phases


def run_trl(spec: dict, paths: dict, work: Path, steps: int) -> list[float]:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    rows = [json.loads(line) for line in Path(paths["data"]).read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": row["prompt"], "answer": str(row.get("answer", ""))} for row in rows])
    reward = trl_kdrl_math if spec.get("reward") == "math" else trl_char_parity
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    clock = StepClock()

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.ends.append(time.perf_counter())

    batch = spec["prompts"] * spec["group"]
    common = dict(output_dir=str(work / "trl"), per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                  max_steps=steps, learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0,
                  logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                  gradient_checkpointing=False, max_completion_length=spec["max_new_tokens"], temperature=1.0,
                  top_p=1.0, top_k=0, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    if spec["kind"] == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(num_generations=spec["group"], **common)
        trainer = GRPOTrainer(model=paths["student"], reward_funcs=reward, args=args,
                              train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()])
    else:
        from trl import DistillationConfig, DistillationTrainer

        args = DistillationConfig(beta=1.0, **common)
        trainer = DistillationTrainer(model=paths["student"], teacher_model=paths["teacher"], args=args,
                                      train_dataset=dataset, processing_class=tokenizer, callbacks=[Clock()])
    trainer.train()
    return clock.ends, []


def worker(args: argparse.Namespace) -> None:
    import torch

    spec, paths = CONFIGS[args.config], json.loads(args.paths)
    if args.system == "trl-1thread":
        torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="vs_trl_"))
    steps = spec["warmup"] + (args.measured_steps or spec["steps"])
    runner = run_kdrl if args.system == "kdrl" else run_trl
    ends, phases = runner(spec, paths, work, steps)
    warm = spec["warmup"]
    per_step = (ends[-1] - ends[warm - 1]) / (len(ends) - warm)
    mean_phases = {}
    for record in phases[warm:]:
        for key, value in record.items():
            mean_phases[key] = mean_phases.get(key, 0.0) + value / (len(phases) - warm)
    threads = str(torch.get_num_threads())
    if args.system == "kdrl":
        from kdrl.cpu_threads import current_policy

        policy = current_policy()
        if policy is not None and policy.decode != policy.dense:
            threads += f" ({policy.decode} decoding)"
    print("VS_TRL_RESULT " + json.dumps({"per_step": per_step, "threads": threads,
                                         "phases": mean_phases, "steps": len(ends)}), flush=True)


# ----------------------------------------------------------------------------- the comparison

def measure(config: str, system: str, paths: dict, measured_steps: int = 0) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--config", config, "--system", system,
               "--paths", json.dumps(paths), "--measured-steps", str(measured_steps)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    load_before = os.getloadavg()[0]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("VS_TRL_RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{system} on {config} failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    # the 1-minute load average before and after: this run's own process counts about 1 in "after"
    return {**json.loads(lines[-1].split(" ", 1)[1]), "load": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def summarize(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "runs": values}


def compare(configs: list[str], rounds: Optional[int], systems: list[str], root: Path, default_thread_rounds: int,
            done: Callable[[dict], None] = lambda results: None, default_thread_steps: int = 2) -> dict:
    """``default_thread_rounds``: TRL with torch's default threads runs in the first rounds only, on
    ``default_thread_steps`` measured steps (0: as many as the others; on a shared machine its steps
    can take 20 times as long as with one thread)."""
    results = {}
    for config in configs:
        paths = build_assets(root, config)
        runs: dict[str, list[dict]] = {system: [] for system in systems}
        for round_index in range(rounds or CONFIGS[config].get("rounds", 3)):
            order = systems if round_index % 2 == 0 else list(reversed(systems))  # alternate who goes first
            for system in order:
                if system == "trl" and round_index >= default_thread_rounds:
                    continue
                short = default_thread_steps if system == "trl" else 0
                result = measure(config, system, paths, short)
                runs[system].append(result)
                print(f"{config} round {round_index + 1} {system}: {result['per_step']:.3f} s/step "
                      f"({result['threads']} threads, load {result['load'][0]} -> {result['load'][1]})", flush=True)
        summary = {system: summarize([r["per_step"] for r in runs[system]]) for system in systems if runs[system]}
        trl_systems = [s for s in systems if s.startswith("trl") and s in summary]
        best_trl = min(trl_systems, key=lambda s: summary[s]["median"])
        summary["ratio_trl_over_kdrl"] = summary[best_trl]["median"] / summary["kdrl"]["median"]
        summary["best_trl"] = best_trl
        summary["kdrl_phases"] = runs["kdrl"][-1]["phases"]
        summary["threads"] = {system: [r["threads"] for r in runs[system]] for system in systems if runs[system]}
        summary["load"] = [load for system in systems for r in runs[system] for load in r["load"]]
        summary["spec"] = {**CONFIGS[config], "student_params": paths.get("student_params"),
                           "teacher_params": paths.get("teacher_params")}
        results[config] = summary
        done(results)  # written after each configuration: a later failure keeps the earlier ones
    return results


def table(results: dict) -> str:
    lines = ["| config | TRL default threads (s/step, min / median / max) | TRL 1 thread | kdrl | TRL / kdrl |",
             "|---|---|---|---|---|"]
    for config, summary in results.items():
        cells = []
        for system in ("trl", "trl-1thread", "kdrl"):
            s = summary.get(system)
            cells.append("-" if s is None else f"{s['min']:.3f} / **{s['median']:.3f}** / {s['max']:.3f}")
        lines.append(f"| {config} | {' | '.join(cells)} | {summary['ratio_trl_over_kdrl']:.2f}x |")
    return "\n".join(lines)


def phases_table(results: dict) -> str:
    lines = ["kdrl's phases (s/step, the last kdrl run of each configuration):", "",
             "| config | generate | teacher | train | rest | mean response tokens |", "|---|---|---|---|---|---|"]
    for config, summary in results.items():
        phases = summary["kdrl_phases"]
        named = [phases.get(f"time_{name}", 0.0) for name in ("generate", "teacher", "train")]
        rest = sum(v for k, v in phases.items() if k.startswith("time_")) - sum(named)
        lines.append(f"| {config} | " + " | ".join(f"{value:.3f}" for value in named + [rest])
                     + f" | {phases.get('response_length', 0.0):.1f} |")
    return "\n".join(lines)


def conditions_table(results: dict) -> str:
    lines = ["Threads each run used (kdrl: its measured policy) and the machine's 1-minute load average "
             "around the runs (each run's own process adds about 1):", "",
             "| config | TRL default | TRL 1 thread | kdrl | load min - max |", "|---|---|---|---|---|"]
    for config, summary in results.items():
        threads = summary.get("threads", {})
        cells = [", ".join(threads.get(system, [])) or "-" for system in ("trl", "trl-1thread", "kdrl")]
        load = summary.get("load") or [0.0]
        lines.append(f"| {config} | {' | '.join(cells)} | {min(load):.2f} - {max(load):.2f} |")
    return "\n".join(lines)


# operator name -> the kind of work it is, for the profile's summary
OP_KINDS = (("matrix products", ("aten::mm", "aten::addmm", "aten::bmm")), ("attention", ("attention",)),
            ("sampling", ("aten::multinomial", "aten::exponential_")))


def profile(config: str, top: int, steps: int = 3) -> None:
    """kdrl's phases per step on one configuration (plain timing, after the warm-up steps), then its
    last step under torch.profiler: seconds by kind of operator, and the top operators."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    spec = CONFIGS[config]
    profiled = {}

    @contextlib.contextmanager
    def last_step():
        start = time.perf_counter()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            yield
        profiled["prof"], profiled["wall"] = prof, time.perf_counter() - start

    with tempfile.TemporaryDirectory(prefix="vs_trl_profile_") as tmp:
        paths = build_assets(Path(tmp), config)
        _, phases = run_kdrl(spec, paths, Path(tmp), spec["warmup"] + steps + 1, last_step)
    measured = phases[spec["warmup"]:-1]
    from kdrl.cpu_threads import current_policy

    print(f"{config}: kdrl {current_policy().describe() if current_policy() else torch.get_num_threads()}; "
          f"phases per step (s, mean of {len(measured)} steps after {spec['warmup']} warm-up):",
          {key: round(sum(p[key] for p in measured) / len(measured), 3) for key in measured[0]})
    averages = profiled["prof"].key_averages()
    total = sum(event.self_cpu_time_total for event in averages) / 1e6
    kinds = {name: 0.0 for name, _ in OP_KINDS}
    for event in averages:
        kind = next((name for name, keys in OP_KINDS if any(key in event.key for key in keys)), None)
        if kind is not None:
            kinds[kind] += event.self_cpu_time_total / 1e6
    shares = ", ".join(f"{name} {value:.3f} s ({value / total:.0%})" for name, value in kinds.items())
    print(f"one more step under torch.profiler, {profiled['wall']:.3f} s wall: {total:.3f} s in operators "
          f"({shares}, other operators {total - sum(kinds.values()):.3f} s), the rest Python between them")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=top))


def profile_trl(config: str, threads: int = 1) -> None:
    """TRL's step at ``threads`` threads split by plain timing into generate, teacher and student decoder
    forwards outside generate, and backward (patched in this process only), for a side-by-side view
    with ``profile``'s phases of kdrl."""
    import torch
    from transformers import Qwen2Model, TrainerCallback, trainer as hf_trainer
    from transformers.generation.utils import GenerationMixin

    torch.set_num_threads(threads)
    spec = CONFIGS[config]
    totals: dict[str, float] = {}
    state = {"generating": False, "steps": 0}

    def timed_call(key_of, original):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                key = key_of(*args)
                if key and state["steps"] >= spec["warmup"]:
                    totals[key] = totals.get(key, 0.0) + time.perf_counter() - start
        return call

    def generating(original):
        def call(*args, **kwargs):
            state["generating"] = True
            try:
                return original(*args, **kwargs)
            finally:
                state["generating"] = False
        return call

    def forward_kind(module, *args):
        if state["generating"]:
            return None
        role = "teacher" if "teacher" in spec and module.config.hidden_size == spec["teacher"]["hidden"] else "student"
        return f"{role} forward" + ("" if torch.is_grad_enabled() else " (no grad)")

    class CountSteps(TrainerCallback):
        def on_step_end(self, args, trainer_state, control, **kwargs):
            state["steps"] += 1

    GenerationMixin.generate = timed_call(lambda *a: "generate", generating(GenerationMixin.generate))
    Qwen2Model.forward = timed_call(forward_kind, Qwen2Model.forward)
    torch.Tensor.backward = timed_call(lambda *a: "backward", torch.Tensor.backward)
    original_init = hf_trainer.Trainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **{**kwargs, "callbacks": list(kwargs.get("callbacks") or []) + [CountSteps()]})
    hf_trainer.Trainer.__init__ = init
    with tempfile.TemporaryDirectory(prefix="vs_trl_profile_") as tmp:
        paths = build_assets(Path(tmp), config)
        ends, _ = run_trl(spec, paths, Path(tmp), spec["warmup"] + spec["steps"])
    measured = len(ends) - spec["warmup"]
    per_step = (ends[-1] - ends[spec["warmup"] - 1]) / measured
    named = {key: round(value / measured, 3) for key, value in totals.items()}
    print(f"{config}: TRL {threads} thread(s), {per_step:.3f} s/step (mean of {measured} after {spec['warmup']} warm-up): "
          f"{named}, the rest {per_step - sum(named.values()):.3f} s (rewards, log-softmax, optimizer, ...)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternated rounds (default: each configuration's own, 3 or 2 for grpo_large)")
    parser.add_argument("--systems", default="trl,trl-1thread,kdrl")
    parser.add_argument("--default-thread-rounds", type=int, default=1,
                        help="rounds in which TRL also runs with torch's default thread count")
    parser.add_argument("--default-thread-steps", type=int, default=2,
                        help="measured steps of TRL with torch's default thread count (0: the configuration's)")
    parser.add_argument("--out", type=Path, default=None, help="write results.json and results.md here")
    parser.add_argument("--note", default="", help="a line for results.md (e.g. whether the machine was shared)")
    parser.add_argument("--profile", metavar="CONFIG", help="profile kdrl's steps on CONFIG instead of comparing")
    parser.add_argument("--profile-trl", metavar="CONFIG", help="time TRL's phases on CONFIG instead of comparing")
    parser.add_argument("--profile-threads", type=int, default=1, help="torch threads for --profile-trl")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    parser.add_argument("--measured-steps", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.profile:
        return profile(args.profile, 30)
    if args.profile_trl:
        return profile_trl(args.profile_trl, args.profile_threads)
    import torch
    import transformers
    import trl

    started = time.time()
    environment = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                   "cpus": os.cpu_count(), "python": platform.python_version(), "rounds": args.rounds,
                   "note": args.note, "command": "python benchmarks/vs_trl.py " + shlex.join(sys.argv[1:])}

    def write(results: dict) -> None:
        if args.out is None:
            return
        args.out.mkdir(parents=True, exist_ok=True)
        environment["wall_s"] = round(time.time() - started)
        (args.out / "results.json").write_text(json.dumps({"environment": environment, "results": results},
                                                          indent=1) + "\n")
        header = (f"# kdrl vs TRL, per-step cost\n\n`{environment['command']}`: TRL {trl.__version__}, transformers "
                  f"{transformers.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
                  f"{environment['wall_s']} s in all. {args.note}\n\n")
        (args.out / "results.md").write_text(header + table(results) + "\n\n" + phases_table(results) + "\n\n"
                                             + conditions_table(results) + "\n")

    with tempfile.TemporaryDirectory(prefix="vs_trl_assets_") as tmp:
        results = compare(args.configs.split(","), args.rounds, args.systems.split(","), Path(tmp),
                          args.default_thread_rounds, write, args.default_thread_steps)
    print(table(results))
    print(phases_table(results))

if __name__ == "__main__":
    main()
