"""``prepare_demo(out_dir)``: the whole bundle from nothing (no downloads) -- data, the two models
trained by SFT (kdrl.demo.sft), each evaluated greedily, saved with a manifest of every number."""
from __future__ import annotations

import json
import os
import platform
import random
import shutil
import time
from dataclasses import asdict
from typing import Any, Callable

import torch

from kdrl.demo.sft import prompt_encoder, train_sft
from kdrl.demo.specs import ROLES, SCALES, ModelSpec, TrainSpec
from kdrl.demo.tiny_models import EOS_TOKEN, PAD_TOKEN, build_tokenizer, make_model, num_params
from kdrl.evaluate import evaluate_problems
from kdrl.rollout.hf import HFRolloutEngine
from kdrl.tasks.chains import export_jsonl
from kdrl.tasks.sums import SumsTaskConfig, generate_problems, is_correct
from kdrl.types import Problem


def evaluate(model, tokenizer: Any, problems: list[Problem], max_new_tokens: int = 80, batch_size: int = 256) -> dict:
    """Greedy accuracy and whole-chain correctness (kdrl.evaluate, the hf engine), the fraction of
    responses with a ``\\boxed{}``, accuracy by chain length, and the first three responses."""
    engine = HFRolloutEngine(model, tokenizer, prompt_encoder(tokenizer), generation_batch_size=batch_size)
    details: list[dict] = []
    metrics = evaluate_problems(engine, problems, is_correct, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                details=details, detail_responses=True)
    responses = [record["responses"][0] for record in details]
    by_steps: dict[int, list[int]] = {}
    for problem, record in zip(problems, details):
        by_steps.setdefault(problem.metadata["steps"], []).append(record["correct"][0])
    return {
        "n": len(problems),
        "accuracy": round(metrics["accuracy"], 4),
        "chain_correct": round(metrics["chain_correct"], 4),
        "boxed_rate": round(sum("\\boxed{" in r for r in responses) / max(1, len(responses)), 4),
        "accuracy_by_steps": {str(k): round(sum(v) / len(v), 4) for k, v in sorted(by_steps.items())},
        "samples": [{"prompt": p.prompt, "response": r} for p, r in list(zip(problems, responses))[:3]],
    }


def problems_of(rows: list[dict]) -> list[Problem]:
    """kdrl Problems of generated task rows (their fields are Problem's)."""
    return [Problem(**row) for row in rows]


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
    _pad_on_the_left(tokenizer)
    tokenizer.save_pretrained(path)


def _pad_on_the_left(tokenizer) -> None:
    """Left padding to the longest row, recorded in the saved tokenizer.json, so that a tokenizer
    loaded from the bundle pads on the left (``padding_side`` "left"). The shipped bundle's files
    hold it because its first builder's evaluator padded prompt batches through the tokenizer, which
    keeps the last padding it applied; set here explicitly, a rebuild writes the same files."""
    tokenizer.backend_tokenizer.enable_padding(direction="left", pad_id=tokenizer.pad_token_id,
                                               pad_type_id=tokenizer.pad_token_type_id, pad_token=tokenizer.pad_token)


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
    pool_size = max(S["teacher_train"].n_examples, S["student_train"].n_examples)
    sft_pool = problems_of(generate_problems("sft", pool_size, seed + 1000, task))
    # Validation for early stopping: another draw from the train split (it may share
    # prompts with the SFT pool, never with test_id or test_ood).
    val = problems_of(generate_problems("train", S["n_val"], seed + 2000, task))
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
        ev = {split: evaluate(model, tokenizer, problems_of(data[split]), S["max_new_tokens"])
              for split in ("test_id", "test_ood")}
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
