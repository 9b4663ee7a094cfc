"""The bundled demo: a one-token-per-character tokenizer, a tiny Qwen2 teacher and student.

``prepare_demo(out_dir)`` builds the whole bundle from nothing (no downloads):

    out_dir/teacher/   Qwen2ForCausalLM (safetensors) + tokenizer + generation_config
    out_dir/student/   a smaller, on purpose undertrained Qwen2 with the same tokenizer
    out_dir/data/      train.jsonl, test_id.jsonl, test_ood.jsonl (kdrl.tasks.sums)
    out_dir/manifest.json

Both models learn the running-sums task (kdrl/tasks/sums.py) by plain supervised
fine-tuning on ``prompt + solution + eos`` of its ``sft`` pool, with the loss on the
response tokens only.  The teacher is trained until it is good but imperfect; the
student is stopped early, while it writes the answer format but gets few sums right,
so that RL and distillation have something to improve.  No chat template: the prompt
text is exactly what the model sees before its response.  (``build_tokenizer`` and
``make_model`` also build the test fixtures, which use the older chains-mod10 task:
keep them unchanged.)

Command line: ``python -m kdrl.demo --out kdrl/assets/demo [--seed 0] [--scale full|toy]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from kdrl.tasks.chains import export_jsonl
from kdrl.tasks.sums import SumsTaskConfig, chain_correct, generate_problems, is_correct

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|eos|>"


# --------------------------------------------------------------------------- tokenizer

def build_tokenizer():
    """A byte-level tokenizer with no merges: one token per byte (so per ASCII character).

    It is a real ``Qwen2Tokenizer`` (byte-level BPE, Qwen2's pre-tokenizer and
    decoder) whose vocabulary is ``<|pad|>`` (id 0), ``<|eos|>`` (id 1) and the
    256 byte symbols, with an empty merge list.  Being the class transformers
    assigns to Qwen2 checkpoints, ``AutoTokenizer.from_pretrained`` rebuilds
    exactly the same tokenizer from the saved files (transformers 5 forces
    ``Qwen2Tokenizer`` for model_type qwen2 whatever tokenizer_class says, so a
    differently built tokenizer would be silently replaced).  Nothing is added
    when encoding; ``decode(encode(s)) == s`` for any NFC-normalised string.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    byte_symbols = bytes_to_unicode()
    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1}
    for b in range(256):
        vocab[byte_symbols[b]] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,  # every byte has a token: nothing is unknown
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )


# --------------------------------------------------------------------------- models

def make_model(
    tokenizer,
    hidden_size: int,
    layers: int,
    heads: int,
    intermediate: int,
    seed: int,
    kv_heads: int | None = None,
    max_position_embeddings: int = 256,
):
    """A freshly initialised ``Qwen2ForCausalLM`` sized for ``tokenizer`` (tied embeddings)."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,  # as in Qwen2: no separate BOS token
        initializer_range=0.02,
        use_cache=True,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        do_sample=False,
        max_new_tokens=96,
    )
    return model


def num_params(model) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- training

def _encode_examples(tokenizer, problems: list[dict]) -> list[tuple[list[int], int]]:
    """(ids of prompt + solution + eos, prompt length) for each problem."""
    out = []
    for p in problems:
        prompt_ids = tokenizer.encode(p["prompt"], add_special_tokens=False)
        resp_ids = tokenizer.encode(p["solution"], add_special_tokens=False)
        out.append((prompt_ids + resp_ids + [tokenizer.eos_token_id], len(prompt_ids)))
    return out


def _collate(examples, pad_id: int):
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    for r, (ids, n_prompt) in enumerate(examples):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attn[r, : len(ids)] = 1
        labels[r, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])  # response + eos only
    return input_ids, attn, labels


def sft_loss(model, input_ids, attn, labels) -> torch.Tensor:
    """Mean next-token cross entropy over response tokens (labels != -100)."""
    logits = model(input_ids=input_ids, attention_mask=attn).logits[:, :-1]
    target = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100
    )


def train_sft(
    model,
    tokenizer,
    problems: list[dict],
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    warmup: int = 50,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.01,
    seed: int = 0,
    eval_every: int = 0,
    eval_fn: Callable[[int], float] | None = None,
    stop_at: float | None = None,
    stop_min_step: int = 0,
    dense_eval_margin: float = 0.15,
    log: Callable[[str], None] = print,
    log_every: int = 100,
) -> dict:
    """Supervised fine-tuning with AdamW and a warmup + cosine learning-rate schedule.

    Every ``eval_every`` steps ``eval_fn(step)`` returns an accuracy; training stops
    early once it reaches ``stop_at`` at a step >= ``stop_min_step`` (the early stop
    that keeps a model imperfect).  Once the accuracy is within ``dense_eval_margin``
    (at most half of ``stop_at``) of ``stop_at`` it is checked five times as often, so that a sudden jump in
    accuracy does not overshoot the target by much.
    Returns ``{"steps", "seconds", "final_loss", "evals": [(step, acc), ...]}``.
    """
    examples = _encode_examples(tokenizer, problems)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    t0 = time.time()
    order: list[int] = []
    evals: list[tuple[int, float]] = []
    ema = None
    step = 0
    next_eval = eval_every
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order.extend(more)
        batch = [examples[i] for i in order[:batch_size]]
        del order[:batch_size]
        input_ids, attn, labels = _collate(batch, tokenizer.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step - 1)
        loss = sft_loss(model, input_ids, attn, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if log_every and step % log_every == 0:
            log(f"  step {step:5d}  loss {ema:.4f}  lr {lr_at(step - 1):.2e}  {time.time() - t0:6.1f}s")
        if eval_fn is not None and eval_every and step >= next_eval:
            model.eval()
            acc = eval_fn(step)
            model.train()
            evals.append((step, acc))
            log(f"  step {step:5d}  eval accuracy {acc:.3f}")
            if stop_at is not None and acc >= stop_at and step >= stop_min_step:
                log(f"  early stop at step {step} (accuracy {acc:.3f} >= {stop_at})")
                break
            close = stop_at is not None and acc >= stop_at - min(dense_eval_margin, stop_at / 2)
            next_eval = step + (max(1, eval_every // 5) if close else eval_every)
    model.eval()
    return {"steps": step, "seconds": round(time.time() - t0, 1), "final_loss": ema, "evals": evals}


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = 80, batch_size: int = 256) -> list[str]:
    """Greedy completions (decoded response text, special tokens dropped)."""
    model.eval()
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            outs.extend(tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return outs


def evaluate(model, tokenizer, problems: list[dict], max_new_tokens: int = 80, batch_size: int = 256) -> dict:
    """Greedy accuracy, whole-chain correctness, fraction of responses with a ``\\boxed{}``,
    accuracy by chain length."""
    responses = generate_greedy(model, tokenizer, [p["prompt"] for p in problems], max_new_tokens, batch_size)
    correct = [is_correct(p, r) for p, r in zip(problems, responses)]
    chains = [chain_correct(p, r) for p, r in zip(problems, responses)]
    by_steps: dict[int, list[bool]] = {}
    for p, c in zip(problems, correct):
        by_steps.setdefault(p["metadata"]["steps"], []).append(c)
    return {
        "n": len(problems),
        "accuracy": round(sum(correct) / max(1, len(correct)), 4),
        "chain_correct": round(sum(chains) / max(1, len(chains)), 4),
        "boxed_rate": round(sum("\\boxed{" in r for r in responses) / max(1, len(responses)), 4),
        "accuracy_by_steps": {str(k): round(sum(v) / len(v), 4) for k, v in sorted(by_steps.items())},
        "samples": [{"prompt": p["prompt"], "response": r} for p, r in list(zip(problems, responses))[:3]],
    }


# --------------------------------------------------------------------------- the bundle

@dataclass
class ModelSpec:
    hidden_size: int
    layers: int
    heads: int
    intermediate: int
    kv_heads: int | None = None


@dataclass
class TrainSpec:
    steps: int
    batch_size: int
    lr: float
    warmup: int
    n_examples: int  # distinct training problems the model sees
    eval_every: int = 0
    stop_at: float | None = None  # early stop once validation accuracy reaches this
    stop_min_step: int = 0  # ... but not before this step


SCALES = {
    "full": {
        "n_train": 2000, "n_test_id": 500, "n_test_ood": 500, "n_val": 200, "max_new_tokens": 64,
        # head_dim 32 in both (vLLM's CPU attention supports 32 and 64); student/teacher ~0.2 in size
        "teacher": ModelSpec(hidden_size=128, layers=4, heads=4, intermediate=512),
        "student": ModelSpec(hidden_size=64, layers=3, heads=2, intermediate=256),
        # The teacher stops once it solves 85% of validation sums (it would reach ~100%).
        "teacher_train": TrainSpec(steps=1200, batch_size=64, lr=3e-3, warmup=100, n_examples=50000,
                                   eval_every=50, stop_at=0.85),
        # The student stops as soon as it solves 22% of validation sums (guessing gets ~1%): it
        # writes the format and copies operands, and gets part of the carries right, so that
        # the outcome reward alone (GRPO) has successes to learn from in most groups.
        "student_train": TrainSpec(steps=1200, batch_size=64, lr=3e-3, warmup=100, n_examples=50000,
                                   eval_every=25, stop_at=0.22, stop_min_step=100),
    },
    "toy": {
        "n_train": 32, "n_test_id": 16, "n_test_ood": 16, "n_val": 8, "max_new_tokens": 24,
        "teacher": ModelSpec(hidden_size=32, layers=2, heads=2, intermediate=64),
        "student": ModelSpec(hidden_size=16, layers=1, heads=2, intermediate=32),
        "teacher_train": TrainSpec(steps=8, batch_size=16, lr=3e-3, warmup=2, n_examples=128,
                                   eval_every=4, stop_at=1.0),
        "student_train": TrainSpec(steps=4, batch_size=16, lr=3e-3, warmup=2, n_examples=128),
    },
}


ROLES = ("teacher", "student")


def _kept_roles(out_dir: str, seed: int, scale: str, roles: tuple[str, ...]) -> dict:
    """Manifest entries of the roles not rebuilt, checked to come from the same seed and scale."""
    keep = [role for role in ROLES if role not in roles]
    if not keep:
        return {}
    path = os.path.join(out_dir, "manifest.json")
    if not os.path.isfile(path):
        raise ValueError(f"keeping {keep} needs an existing bundle with a manifest.json at {out_dir}")
    with open(path) as f:
        old = json.load(f)
    if (old.get("seed"), old.get("scale")) != (seed, scale):
        raise ValueError(f"{path} was built with seed {old.get('seed')} and scale {old.get('scale')!r}; "
                         f"keeping {keep} needs the same seed and scale (got {seed}, {scale!r})")
    for role in keep:
        if role not in old or not os.path.isfile(os.path.join(out_dir, role, "model.safetensors")):
            raise ValueError(f"keeping {role}: {os.path.join(out_dir, role)} has no model or manifest entry")
    # an entry from a full build has no command of its own: the build's command made it
    return {role: {**old[role], "command": old[role].get("command", old.get("command"))} for role in keep}


def _build_model(tokenizer, spec: ModelSpec, seed: int):
    return make_model(tokenizer, spec.hidden_size, spec.layers, spec.heads, spec.intermediate, seed,
                      kv_heads=spec.kv_heads)


def _save_model(model, tokenizer, path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def prepare_demo(
    out_dir: str,
    seed: int = 0,
    scale: str = "full",
    log: Callable[[str], None] = print,
    threads: int = 2,
    roles: tuple[str, ...] = ROLES,
) -> dict:
    """Build data, train teacher and student, evaluate both, save the bundle; returns the manifest.

    ``threads``: torch CPU threads (use 1 when other processes share the cores:
    oversubscribed threads slow training many times over).  The result does not
    depend on it beyond floating-point rounding.
    ``roles``: the models to (re)train; any other role is kept as it is in ``out_dir``, with
    its manifest entry, which must come from a build with the same seed and scale (each role
    is trained from its own seed, so keeping one does not change the other).
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    unknown = sorted(set(roles) - set(ROLES))
    if unknown or not roles:
        raise ValueError(f"roles must be a non-empty subset of {list(ROLES)}, got {list(roles)}")
    kept = _kept_roles(out_dir, seed, scale, roles)
    S = SCALES[scale]
    t_start = time.time()
    torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    task = SumsTaskConfig()

    # Data.  The shipped train file and the (larger) SFT pool both come from the
    # train split, which is disjoint from test_id by construction.
    data = {
        "train": generate_problems("train", S["n_train"], seed, task),
        "test_id": generate_problems("test_id", S["n_test_id"], seed, task),
        "test_ood": generate_problems("test_ood", S["n_test_ood"], seed, task),
    }
    for split, problems in data.items():
        export_jsonl(problems, os.path.join(out_dir, "data", f"{split}.jsonl"))
    sft_pool = generate_problems("sft", max(S["teacher_train"].n_examples, S["student_train"].n_examples),
                                 seed + 1000, task)
    # Validation for early stopping: another draw from the train split (it may share
    # prompts with the SFT pool, never with test_id or test_ood).
    val = generate_problems("train", S["n_val"], seed + 2000, task)
    log(f"[demo] data: train {len(data['train'])}, test_id {len(data['test_id'])}, "
        f"test_ood {len(data['test_ood'])}, sft pool {len(sft_pool)}, val {len(val)}")

    tokenizer = build_tokenizer()
    results: dict = {}
    for role in ROLES:
        if role in kept:
            results[role] = kept[role]
            log(f"[demo] {role}: kept from {os.path.join(out_dir, role)}")
            continue
        spec: ModelSpec = S[role]
        tspec: TrainSpec = S[f"{role}_train"]
        model = _build_model(tokenizer, spec, seed + (0 if role == "teacher" else 1))
        n = num_params(model)
        log(f"[demo] {role}: {asdict(spec)}, {n:,} parameters; SFT up to {tspec.steps} steps")
        eval_fn = None
        if tspec.eval_every:
            def eval_fn(step, model=model):
                return evaluate(model, tokenizer, val, S["max_new_tokens"])["accuracy"]
        train_info = train_sft(
            model, tokenizer, sft_pool[: tspec.n_examples], steps=tspec.steps, batch_size=tspec.batch_size,
            lr=tspec.lr, warmup=tspec.warmup, seed=seed, eval_every=tspec.eval_every, eval_fn=eval_fn,
            stop_at=tspec.stop_at, stop_min_step=tspec.stop_min_step, log=log, log_every=100 if scale == "full" else 0,
        )
        log(f"[demo] {role}: trained {train_info['steps']} steps in {train_info['seconds']}s; evaluating")
        ev = {split: evaluate(model, tokenizer, data[split], S["max_new_tokens"]) for split in ("test_id", "test_ood")}
        for split, e in ev.items():
            log(f"[demo] {role} {split}: accuracy {e['accuracy']:.3f}, chain correct {e['chain_correct']:.3f}, "
                f"boxed {e['boxed_rate']:.3f}, "
                f"by steps {e['accuracy_by_steps']}")
        _save_model(model, tokenizer, os.path.join(out_dir, role))
        results[role] = {
            "architecture": "Qwen2ForCausalLM",
            "config": asdict(spec),
            "parameters": n,
            "train": {**asdict(tspec), **{k: v for k, v in train_info.items()}},
            "eval": {split: {k: v for k, v in e.items() if k != "samples"} for split, e in ev.items()},
            "samples": ev["test_id"]["samples"],
        }

    command = f"python -m kdrl.demo --out <dir> --seed {seed} --scale {scale} --threads {threads}"
    if tuple(roles) != ROLES:
        command += " --roles " + " ".join(roles)
    for role in roles:  # a kept role keeps the command that trained it
        results[role]["command"] = command
    manifest = {
        "name": "kdrl demo bundle: running sums (kdrl.tasks.sums)",
        "command": command,
        "seed": seed,
        "scale": scale,
        "task": asdict(task),
        "sample": {k: data["train"][0][k] for k in ("prompt", "solution", "answer")},
        "data": {split: {"file": f"data/{split}.jsonl", "rows": len(p)} for split, p in data.items()},
        "tokenizer": {"kind": "Qwen2Tokenizer, byte-level BPE without merges (one token per byte)",
                      "vocab_size": len(tokenizer),
                      "pad_token": PAD_TOKEN, "eos_token": EOS_TOKEN, "chat_template": None},
        "teacher": results["teacher"],
        "student": results["student"],
        "student_teacher_param_ratio": round(results["student"]["parameters"] / results["teacher"]["parameters"], 4),
        "build_seconds": round(time.time() - t_start, 1),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
    }
    manifest["bundle_bytes"] = _dir_bytes(out_dir)
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    log(f"[demo] done in {manifest['build_seconds']}s; bundle {manifest['bundle_bytes'] / 1e6:.1f} MB at {out_dir}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kdrl.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "assets", "demo"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 on a busy machine)")
    ap.add_argument("--roles", nargs="+", choices=ROLES, default=list(ROLES),
                    help="models to (re)train; the others are kept from --out")
    args = ap.parse_args(argv)
    prepare_demo(args.out, seed=args.seed, scale=args.scale, threads=args.threads, roles=tuple(args.roles),
                 log=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
