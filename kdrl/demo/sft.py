"""The bundle's pre-training: supervised fine-tuning from scratch on ``prompt + solution + EOS``,
the loss on the response tokens only, with an early stop on validation accuracy.

Prompts and responses are encoded as the trainer encodes them (``kdrl.data.make_encoder`` with the
default data settings: the prompt text as it is, no chat template; ``kdrl.data.response_token_ids``),
so the models are trained on exactly the ids a run feeds them.

This is not the trainer's dataset SFT (``rollout.policy=dataset``) on purpose: that one scores
π_old of every dataset row (a third more per step, unused by SFT), has no stop on validation accuracy
and no floor under its cosine schedule, and forms the loss from chunked response logits with
another padding and summation order, so it cannot rebuild the shipped bundle bit for bit. The loop
below is the one the bundle was built with, unchanged in every floating-point operation.
"""
from __future__ import annotations

import math
import random
import time
from typing import Any, Callable

import torch

from kdrl.config import Config
from kdrl.data import make_encoder, response_token_ids
from kdrl.types import Problem


def prompt_encoder(tokenizer: Any) -> Callable[..., list[int]]:
    """``encode(problem, suffix="") -> prompt ids``, the trainer's with the default data settings."""
    return make_encoder(tokenizer, Config(), tokenizer.model_max_length)


def encode_examples(tokenizer: Any, problems: list[Problem]) -> list[tuple[list[int], int]]:
    """(ids of prompt + solution + EOS, prompt length) for each problem."""
    encode = prompt_encoder(tokenizer)
    out = []
    for problem in problems:
        prompt_ids = encode(problem)
        out.append((prompt_ids + response_token_ids(tokenizer, problem.solution), len(prompt_ids)))
    return out


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), right padded; labels are -100 outside the responses."""
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
    problems: list[Problem],
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
    examples = encode_examples(tokenizer, problems)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)

    def lr_at(step):  # (kdrl.build.lr_lambda has no floor, and its warmup rounds lr * factor differently)
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
        input_ids, attn, labels = collate(batch, tokenizer.pad_token_id)
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
