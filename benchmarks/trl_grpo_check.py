"""Does GRPO alone learn the bundled task in TRL either?  An outside check of kdrl's grpo rows.

TRL's ``GRPOTrainer`` trains the bundled student on the bundled train prompts with kdrl's reward
(the math verifier on the last box), at the comparison's budget and settings (16 prompts x 8
responses, <= 64 new tokens, temperature 1, learning rate 3e-4 after 10 warmup steps, clip 0.2, no
KL term, 200 steps by default); the trained model is then scored like every comparison run (avg@4 at
temperature 1 on 200 test_id and 200 test_ood problems, through kdrl's evaluator). TRL's own
per-step reward log is kept so its curve can be set beside kdrl's ``grpo`` runs.

    pip install -e ".[bench]"
    python benchmarks/trl_grpo_check.py --out benchmarks/results/sums_5seeds/trl_grpo

TRL's defaults are kept where the comparison sets nothing (its loss aggregation, reward scaling
by the group's standard deviation, ...); ``results.json`` records TRL's version and every argument.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from vs_trl import trl_kdrl_math  # kdrl's math reward in TRL's reward-function form (benchmarks/vs_trl.py)

from kdrl.cli import main as kdrl_main
from kdrl.data import load_problems
from kdrl.models import bundled_model_dir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import trl
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from transformers import AutoModelForCausalLM, AutoTokenizer

    dataset = Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in load_problems("bundled:train")])
    student = AutoModelForCausalLM.from_pretrained(bundled_model_dir("student"))
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir("student"))
    prompts, group = 16, 8
    trl_args = GRPOConfig(
        output_dir=str(out / "trainer"), per_device_train_batch_size=prompts * group, num_generations=group,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=10, max_grad_norm=1.0, epsilon=0.2, beta=0.0, max_completion_length=64, temperature=1.0,
        top_p=1.0, top_k=0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
        seed=args.seed, dataloader_num_workers=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=student, reward_funcs=trl_kdrl_math, args=trl_args, train_dataset=dataset,
                          processing_class=tokenizer)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    trainer.model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    curve = [{"step": r["step"], "reward": r.get("reward"), "entropy": r.get("entropy"),
              "completion_length": r.get("completions/mean_length")}
             for r in trainer.state.log_history if "reward" in r]
    summary = {"trl_version": trl.__version__, "args": {k: v for k, v in vars(args).items() if k != "out"}, "train_seconds": wall,
               "grpo_config": {k: str(getattr(trl_args, k, None)) for k in
                               ("loss_type", "scale_rewards", "epsilon", "beta", "num_generations",
                                "learning_rate", "per_device_train_batch_size", "num_iterations")},
               "curve": curve}
    (out / "train.json").write_text(json.dumps(summary, indent=2))
    # scored exactly as the comparison's runs are: avg@4 at temperature 1, 200 problems per set
    kdrl_main(["eval", "--model", f"trl_grpo={out / 'model'}", "--samples", "4", "--temperature", "1.0",
               "--limit", "200", "--seed", str(args.seed), "--out", str(out / "eval.json")])


if __name__ == "__main__":
    main()
