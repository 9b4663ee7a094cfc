"""The ``hf`` engine: a decoding loop of its own over a transformers model's forward with a KV cache,
one prefill per prompt group, and per-token sampler log-probs taken from the decoding itself.

It draws from the random generator exactly as transformers' ``generate`` sampling does (one
``torch.multinomial`` over every row's probabilities per step, finished rows included, stopping when all
rows have ended), so a fixed seed gives the same tokens as ``generate`` would; it only leaves out what
a training loop does not use (generation-config merging, the processor and stopping-criteria lists,
per-step input re-preparation), and it needs no ``generate`` keyword that only some versions accept.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch

from kdrl.cpu_threads import decode_threads
from kdrl.distributed import gathered_for_generation
from kdrl.models import position_ids_from_mask, unwrap
from kdrl.rollout import SamplingParams
from kdrl.rollout.kv_cache import preallocated_cache
from kdrl.rollout.rows import left_pad
from kdrl.types import Problem, Rollouts


class HFRolloutEngine:
    """G samples per prompt: every prompt but its last token runs through the model once, its KV
    cache is repeated G times (``Cache.batch_repeat_interleave``), then each step feeds one token per row.

    Sequences stop at EOS one by one (finished rows are fed padding, as ``generate`` does, and the loop
    ends when all are done). pi_old is the untruncated log softmax(logits / T) of the chosen token, the
    function the trainer recomputes; top-p only restricts what is sampled (a sampling device, not part
    of pi_old, as in verl and TRL).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, encode: Callable[[Problem, str], list[int]],
                 generation_batch_size: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        self.encode = encode  # problem (+ suffix) -> prompt token ids
        self.generation_batch_size = generation_batch_size

    @torch.no_grad()
    def generate(self, problems: list[Problem], n: int, sampling: SamplingParams, step: int = 0,
                 prompt_suffixes: Optional[list[str]] = None) -> Rollouts:
        device = next(self.model.parameters()).device
        suffixes = prompt_suffixes or [""] * len(problems)
        prompts = [self.encode(problem, suffix) for problem, suffix in zip(problems, suffixes)]
        pad_id = self.tokenizer.pad_token_id
        group_ids, group_mask = left_pad(prompts, pad_id)
        prompt_ids, prompt_mask = group_ids.repeat_interleave(n, 0), group_mask.repeat_interleave(n, 0)

        decoder = TokenSampler(sampling, eos_token_ids(self.tokenizer.eos_token_id), pad_id)
        prompts_per_batch = max(1, self.generation_batch_size // n)  # whole groups per decoding loop
        was_training = self.model.training
        self.model.eval()
        chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        try:
            # FSDP2: the full weights once, not per token; on CPU the thread count measured for decoding
            with gathered_for_generation(self.model), decode_threads():
                model = unwrap(self.model)
                for start in range(0, len(prompts), prompts_per_batch):
                    ids = group_ids[start:start + prompts_per_batch].to(device)
                    mask = group_mask[start:start + prompts_per_batch].to(device)
                    chunks.append(tuple(t.cpu() for t in decoder.run(model, ids, mask, n)))
        finally:
            self.model.train(was_training)

        length = max(chunk[0].shape[1] for chunk in chunks)
        response_ids, sampler_logprobs, sampler_entropy = (
            torch.cat([torch.nn.functional.pad(chunk[i], (0, length - chunk[i].shape[1]), value=fill)
                       for chunk in chunks]) for i, fill in ((0, pad_id), (1, 0.0), (2, 0.0)))
        response_mask, truncated = response_mask_until_eos(response_ids, self.tokenizer.eos_token_id)
        response_ids = response_ids.masked_fill(response_mask == 0, pad_id)
        sampler_logprobs = sampler_logprobs * response_mask
        sampler_entropy = sampler_entropy * response_mask
        texts = self.tokenizer.batch_decode(
            [ids[mask.bool()].tolist() for ids, mask in zip(response_ids, response_mask)], skip_special_tokens=True)
        return Rollouts(problems=list(problems), group_size=n, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                        response_ids=response_ids, response_mask=response_mask, sampler_logprobs=sampler_logprobs,
                        response_texts=texts, truncated=truncated, sources=["policy"] * len(prompt_ids),
                        sampler_entropy=sampler_entropy)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to copy: the loop runs the live student."""


class TokenSampler:
    """The decoding loop for one batch of whole prompt groups: tokens, pi_old and H(pi_old) per step."""

    def __init__(self, sampling: SamplingParams, eos_ids: list[int], pad_id: int):
        self.greedy = sampling.temperature == 0
        self.temperature = sampling.temperature if not self.greedy else 1.0
        self.max_new_tokens = sampling.max_new_tokens
        self.top_p = None
        if not self.greedy and sampling.top_p < 1.0:
            from transformers import TopPLogitsWarper  # the same nucleus rule generate applies

            self.top_p = TopPLogitsWarper(sampling.top_p)
        self.eos_ids = torch.tensor(eos_ids, dtype=torch.long)
        self.pad_id = pad_id

    # ended rows leave the forward batch once they are this fraction of it (each drop copies the KV cache)
    drop_finished_at = 0.25

    def run(self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, n: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[rows, R] tokens, log-probs of the chosen tokens and entropies, rows = prompts x n.

        Rows that have ended leave the forward batch (their KV cache rows are dropped) once they are
        ``drop_finished_at`` of it; the sampling step still draws for every row, so the generator is
        consumed as before and the rows still running get the same tokens.
        """
        device = ids.device
        cache_key = cache_keyword(model)
        cache = prefill(model, ids, mask, n, cache_key, capacity=ids.shape[1] + self.max_new_tokens)
        attention = mask.repeat_interleave(n, 0)
        position = position_ids_from_mask(attention)[:, -1:]
        tokens = ids[:, -1:].repeat_interleave(n, 0)
        rows = tokens.shape[0]
        eos_ids = self.eos_ids.to(device)
        unfinished = torch.ones(rows, dtype=torch.bool, device=device)
        batch = torch.arange(rows, device=device)  # the rows in the forward batch
        chosen, logprob_steps, entropy_steps = [], [], []
        for _ in range(self.max_new_tokens):
            out = model(input_ids=tokens, attention_mask=attention, position_ids=position, use_cache=True,
                        logits_to_keep=1, **{cache_key: cache})
            cache = returned_cache(out)
            logprobs = torch.log_softmax(out.logits[:, -1].float() / self.temperature, dim=-1)
            token = self._sample(logprobs, batch, rows).masked_fill(~unfinished, self.pad_id)  # ended: padding
            entropy, logprob = logprobs.new_zeros(rows), logprobs.new_zeros(rows)
            entropy[batch] = -(logprobs.exp() * logprobs).nan_to_num().sum(-1)
            logprob[batch] = logprobs.gather(-1, token[batch, None]).squeeze(-1)
            chosen.append(token)
            logprob_steps.append(logprob)
            entropy_steps.append(entropy)
            unfinished &= ~torch.isin(token, eos_ids)
            if not bool(unfinished.any()):
                break
            running = unfinished[batch]
            ended = len(batch) - int(running.sum())
            if ended and ended >= self.drop_finished_at * len(batch):
                keep = running.nonzero().squeeze(1)
                cache.batch_select_indices(keep)
                batch, attention, position = batch[keep], attention[keep], position[keep]
            tokens = token[batch, None]
            attention = torch.cat([attention, attention.new_ones((len(batch), 1))], dim=-1)
            position = position + 1
        if not chosen:
            empty = torch.zeros(rows, 0, device=device)
            return empty.long(), empty, empty
        return torch.stack(chosen, 1), torch.stack(logprob_steps, 1), torch.stack(entropy_steps, 1)

    def _sample(self, logprobs: torch.Tensor, batch: torch.Tensor, rows: int) -> torch.Tensor:
        """One token per row; ``logprobs`` holds the rows in the forward batch."""
        token = torch.full((rows,), self.pad_id, dtype=torch.long, device=logprobs.device)
        if self.greedy:
            token[batch] = logprobs.argmax(-1)
            return token
        scores = self.top_p(None, logprobs) if self.top_p is not None else logprobs
        # generate's draw: one multinomial over all rows. With one sample it takes one exponential per
        # entry whatever the probabilities, so rows outside the batch get any valid distribution.
        probs = logprobs.new_ones((rows, logprobs.shape[-1]))
        probs[batch] = torch.softmax(scores, dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(1)


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward's KV-cache argument: ``cache`` from transformers 5.2x on, ``past_key_values`` before."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def prefill(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, n: int, cache_key: str,
            capacity: int = 0) -> Any:
    """The KV cache of each prompt but its last token, computed once and repeated for its n rows
    (None when there is nothing to prefill): the prefill costs 1/G of prefilling every row.

    ``capacity``: the positions the cache will hold (prompt + new tokens); given, the cache is
    preallocated for them (``kdrl.rollout.kv_cache``) instead of copied on every token."""
    cache = preallocated_cache(model, capacity) if capacity else None
    if ids.shape[1] < 2:
        return cache
    out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=position_ids_from_mask(mask[:, :-1]),
                use_cache=True, logits_to_keep=1, **({cache_key: cache} if cache is not None else {}))
    cache = returned_cache(out)
    if n > 1:
        cache.batch_repeat_interleave(n)
    return cache


def eos_token_ids(eos_token_id: Any) -> list[int]:
    ids = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    return [int(eos) for eos in ids if eos is not None]


def response_mask_until_eos(response_ids: torch.Tensor, eos_token_id: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """1 on every token up to and including the first EOS; rows without EOS are truncated."""
    is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    for eos in eos_token_ids(eos_token_id):
        is_eos |= response_ids == eos
    # tokens strictly after the first EOS have a cumulative EOS count that already counted it
    eos_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    mask = (~eos_before).float()
    truncated = ~is_eos.any(-1)
    return mask, truncated
