"""GPU check: 3 KDRL steps at the paper's model shapes with each rollout engine (hf, vllm).

    python benchmarks/gpu_check.py --out benchmarks/results/gpu          # one GPU, about 8 minutes
    python benchmarks/gpu_check.py --shapes tiny --device cpu --out OUT_DIR  # the same flow on CPU

Random-init models with the shapes of the paper's pair (arXiv 2506.02208): a Qwen2 1.5B student
(DeepSeek-R1-Distill-Qwen-1.5B's config) and a Qwen2 7B teacher (Qwen2.5-7B's), written by this
script (no downloads). Both get the student's vocabulary (151,936 rows): kdrl's KD compares the
same token ids, and a random model's samples need no real tokenizer (the byte tokenizer is
widened with unreachable entries up to that size). Each engine runs in a fresh process: 3 steps of
recipes/paper/kdrl_1.5b_7b.yaml (bf16, on CPU too) at a reduced response length, then prints per-phase step
times, tokens/s, peak GPU memory, the sampler/trainer log-prob gap, and the KDRL loss of the last
batch computed by the bf16 student and by an fp32 copy of it (they must agree to --loss-tol).

Without CUDA it prints why and exits with status 2 (the tiny shapes run anywhere).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NO_CUDA = 2  # exit status without a GPU
# Qwen2 configs of the paper's student and teacher, as in their config.json files (vocabulary: see above)
SHAPES = {
    "paper": {
        "student": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                        num_key_value_heads=2, max_position_embeddings=131072, tie_word_embeddings=False,
                        rope_theta=10000.0),
        "teacher": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, max_position_embeddings=32768, tie_word_embeddings=False,
                        rope_theta=1000000.0),
        "vocab": 151936,
    },
    # head_dim 32 (vLLM's CPU attention needs >= 32), tied embeddings as in small Qwen2 checkpoints
    "tiny": {
        "student": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
                        rope_theta=10000.0),
        "teacher": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=3,
                        num_key_value_heads=3, max_position_embeddings=1024, tie_word_embeddings=True,
                        rope_theta=10000.0),
        "vocab": 1024,
    },
}


def widened_tokenizer(vocab: int):
    """kdrl's byte tokenizer (ids 0-257 as in the bundled models) padded to ``vocab`` entries with
    multi-byte symbols that encoding never produces but decoding can print."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    from kdrl.demo import EOS_TOKEN, PAD_TOKEN

    symbols = [bytes_to_unicode()[b] for b in range(256)]
    entries = [PAD_TOKEN, EOS_TOKEN] + symbols
    for a in symbols:
        for b in symbols:
            for c in [""] + symbols:
                if len(entries) >= vocab:
                    break
                entries.append(a + b + c)
    return Qwen2Tokenizer(vocab={token: i for i, token in enumerate(entries[:vocab])}, merges=[], unk_token=None,
                          eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, clean_up_tokenization_spaces=False,
                          model_max_length=131072)


def qwen2_config(shape: dict, vocab: int, tokenizer):
    from transformers import Qwen2Config

    shape = dict(shape)
    theta = shape.pop("rope_theta")
    return Qwen2Config(vocab_size=vocab, rope_parameters={"rope_type": "default", "rope_theta": theta},
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       bos_token_id=tokenizer.eos_token_id, rms_norm_eps=1e-6, use_cache=True, **shape)


def build_models(root: Path, shapes: str, device: str) -> dict[str, str]:
    """Write random-init student and teacher (bf16 on a GPU: half the bytes to write) with their tokenizer."""
    import torch
    from transformers import Qwen2ForCausalLM

    spec = SHAPES[shapes]
    tokenizer = widened_tokenizer(spec["vocab"])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    paths = {}
    for seed, name in enumerate(("student", "teacher")):
        torch.manual_seed(seed)
        with torch.device(device):  # initialising 7B parameters on the GPU takes seconds, not minutes
            model = Qwen2ForCausalLM(qwen2_config(spec[name], spec["vocab"], tokenizer)).to(dtype)
        with torch.no_grad():  # a peaked output layer, so samples are not uniform over 152k tokens
            model.get_output_embeddings().weight.mul_(8.0 if not spec[name]["tie_word_embeddings"] else 1.0)
        model.save_pretrained(root / name, safe_serialization=True)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
        paths[f"{name}_params"] = sum(p.numel() for p in model.parameters())
        del model
    return paths


def step_overrides(paths: dict[str, str], engine: str, args: argparse.Namespace, run_dir: Path) -> list[str]:
    """recipes/paper/kdrl_1.5b_7b.yaml on these models and the bundled prompts, at a reduced length."""
    return [f"model.student={paths['student']}", f"model.teacher={paths['teacher']}", "model.dtype=bfloat16",
            "data.train=bundled:train", "data.eval=[]", "data.chat_template=false",
            f"rollout.engine={engine}", f"train.device={args.device}",
            f"rollout.prompts_per_step={args.prompts}", f"rollout.group_size={args.group_size}",
            f"rollout.max_new_tokens={args.max_new_tokens}", f"train.steps={args.steps}",
            f"train.micro_batch_size={args.micro_batch_size}", "checkpoint.save_final=false",
            "checkpoint.every=0", "log.progress=false", "log.plot=false", "log.sample_every=0",
            "log.tensorboard=false", f"log.run_dir={run_dir}"]


def device_used_gib() -> float:
    import torch

    if not torch.cuda.is_available():
        return 0.0
    free, total = torch.cuda.mem_get_info()  # whole device: vLLM's cuMem pool is not torch's allocator
    return (total - free) / 2 ** 30


def timed_sync(engine) -> list[float]:
    """Record how long each ``engine.sync_weights`` call takes (the trainer calls it after every update)."""
    seconds: list[float] = []
    sync = engine.sync_weights

    def timed(model) -> None:
        started = time.perf_counter()
        sync(model)
        seconds.append(time.perf_counter() - started)

    engine.sync_weights = timed
    return seconds


def last_batch_losses(run, rollouts, rewards) -> dict[str, float]:
    """The KDRL loss of one batch from the trained (bf16) student and from an fp32 copy of it, with
    the same teacher log-probs: bf16 training must compute the same objective."""
    import copy
    import dataclasses

    import torch

    from kdrl.trainer import make_batch, student_forward

    teacher = run.teacher_scorer.score(rollouts, need_hidden=run.objective.needs_teacher_hidden)
    batch = run.objective.prepare(make_batch(rollouts, rewards, teacher, None), run.step)
    fp32_run = dataclasses.replace(run, student=copy.deepcopy(run.student).float())
    losses = {}
    with torch.no_grad():
        for name, which in (("loss_bf16", run), ("loss_fp32", fp32_run)):
            total = 0.0
            for rows in torch.arange(batch.num_rows).split(run.config.train.micro_batch_size):
                micro = batch.rows(rows).to(run.device)
                loss, _ = which.objective.loss(micro, student_forward(which, micro))
                total += float(loss)
            losses[name] = total
    return losses


def check_engine(engine: str, paths: dict[str, str], args: argparse.Namespace) -> dict:
    """3 training steps with one engine, in this (fresh) process."""
    import torch

    from kdrl.config import load_config
    from kdrl.build import build
    from kdrl.trainer import training_step

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        run = build(load_config(REPO / "recipes" / "paper" / "kdrl_1.5b_7b.yaml",
                                step_overrides(paths, engine, args, Path(run_dir))))
        result = {"engine": engine, "setup_seconds": time.perf_counter() - started,
                  "gpu_used_after_setup_gib": device_used_gib(), "steps": []}
        peak_used = result["gpu_used_after_setup_gib"]
        sync_seconds = timed_sync(run.student_engine)
        for _ in range(args.steps):
            started = time.perf_counter()
            sync_seconds.clear()
            metrics = training_step(run)
            rollouts, rewards = metrics.pop("_rollouts"), metrics.pop("_rewards")
            tokens = float(rollouts.response_mask.sum())
            result["steps"].append({
                "step_seconds": time.perf_counter() - started, "response_tokens": tokens,
                "generate_tokens_per_second": tokens / max(1e-9, metrics["time_generate"]),
                "sync_seconds": sum(sync_seconds),  # inside time_train: the weights pushed after the update
                **{k: v for k, v in metrics.items() if k.startswith("time_")},
                **{k: metrics[k] for k in ("loss", "kd_loss", "logprob_gap", "response_length") if k in metrics}})
            peak_used = max(peak_used, device_used_gib())
        result.update(last_batch_losses(run, rollouts, rewards))
        result["peak_gpu_used_gib"] = max(peak_used, device_used_gib())
        result["peak_torch_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 \
            if torch.cuda.is_available() else 0.0
        relative = abs(result["loss_bf16"] - result["loss_fp32"]) / max(1e-6, abs(result["loss_fp32"]))
        result["loss_relative_difference"] = relative
        result["loss_matches"] = bool(relative <= args.loss_tol or abs(result["loss_bf16"] - result["loss_fp32"]) <= 1e-7)
        return result


def report(results: list[dict], paths: dict) -> str:
    lines = [f"student {paths['student_params'] / 1e6:,.1f}M, teacher {paths['teacher_params'] / 1e6:,.1f}M parameters",
             "", "| engine | step s | generate s | teacher s | train s (incl. sync) | sync s | generate tokens/s | "
             "peak GPU GiB (device) | logprob_gap | loss bf16 | loss fp32 | match |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        steps = r["steps"][1:] or r["steps"]  # the first step warms up (CUDA graphs, allocator)

        def mean(key: str) -> float:
            return sum(s.get(key, 0.0) for s in steps) / len(steps)

        lines.append(f"| {r['engine']} | {mean('step_seconds'):.1f} | {mean('time_generate'):.1f} | "
                     f"{mean('time_teacher'):.1f} | {mean('time_train'):.1f} | {mean('sync_seconds'):.2f} | "
                     f"{mean('generate_tokens_per_second'):.0f} | {r['peak_gpu_used_gib']:.1f} | "
                     f"{mean('logprob_gap'):.2e} | {r['loss_bf16']:.5f} | {r['loss_fp32']:.5f} | "
                     f"{'yes' if r['loss_matches'] else 'NO'} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="paper")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256, help="reduced from the recipe's 8192")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--loss-tol", type=float, default=5e-2, help="relative difference of the bf16 and fp32 losses")
    parser.add_argument("--out", help="write results.json and results.md here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here, nothing was run. It needs one GPU with ~80 GB (the 1.5B "
              "student, its optimizer, the 7B teacher and vLLM); for the same flow on CPU use "
              "--shapes tiny --device cpu.", file=sys.stderr)
        return NO_CUDA
    with tempfile.TemporaryDirectory() as root:
        started = time.perf_counter()
        paths = build_models(Path(root), args.shapes, args.device)
        print(f"gpu_check: models written in {time.perf_counter() - started:.0f} s", flush=True)
        results = []
        for engine in args.engines:
            with multiprocessing.get_context("spawn").Pool(1) as pool:  # vLLM changes its process; free the GPU
                results.append(pool.apply(check_engine, (engine, paths, args)))
            print(json.dumps(results[-1]), flush=True)
    table = report(results, paths)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        (out / "results.json").write_text(json.dumps({"device": device, "args": vars(args), "models": paths,
                                                      "results": results}, indent=2) + "\n")
        (out / "results.md").write_text(f"{device}\n\n{table}\n")
    return 0 if all(r["loss_matches"] and math.isfinite(r["loss_bf16"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
