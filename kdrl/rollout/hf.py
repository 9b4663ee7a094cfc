"""The ``hf`` engine: transformers' ``generate`` with left padding and per-token sampler log-probs."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from kdrl.distributed import gathered_for_generation
from kdrl.models import unwrap
from kdrl.rollout import SamplingParams
from kdrl.types import Problem, Rollouts


class HFRolloutEngine:
    """G samples per prompt with ``model.generate``.

    The sampler log-probs come from the raw logits that ``generate`` returns, divided by the
    sampling temperature, i.e. the same function the trainer recomputes (top-p truncation is a
    sampling device and is not part of pi_old, as in verl and TRL).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, encode: Callable[[Problem, str], list[int]],
                 generation_batch_size: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        self.encode = encode  # problem (+ suffix) -> prompt token ids
        self.generation_batch_size = generation_batch_size

    def _generation_config(self, sampling: SamplingParams) -> Any:
        from transformers import GenerationConfig

        greedy = sampling.temperature == 0
        # A fresh config: the checkpoint's own defaults (top_k=50, repetition penalties) would make
        # the sampler a different distribution from the policy being trained.
        return GenerationConfig(
            do_sample=not greedy, temperature=None if greedy else sampling.temperature,
            top_p=None if greedy or sampling.top_p >= 1.0 else sampling.top_p, top_k=None if greedy else 0,
            max_new_tokens=sampling.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id, bos_token_id=self.tokenizer.bos_token_id,
            output_logits=True, return_dict_in_generate=True, use_cache=True)

    @torch.no_grad()
    def generate(self, problems: list[Problem], n: int, sampling: SamplingParams,
                 prompt_suffixes: Optional[list[str]] = None) -> Rollouts:
        device = next(self.model.parameters()).device
        suffixes = prompt_suffixes or [""] * len(problems)
        prompts = [self.encode(problem, suffix) for problem, suffix in zip(problems, suffixes)]
        row_prompts = [ids for ids in prompts for _ in range(n)]  # rows of a group are consecutive
        width = max(len(ids) for ids in row_prompts)
        pad_id = self.tokenizer.pad_token_id
        prompt_ids = torch.full((len(row_prompts), width), pad_id, dtype=torch.long)
        prompt_mask = torch.zeros((len(row_prompts), width), dtype=torch.long)
        for row, ids in enumerate(row_prompts):
            prompt_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            prompt_mask[row, width - len(ids):] = 1

        generation_config = self._generation_config(sampling)
        temperature = sampling.temperature if sampling.temperature > 0 else 1.0
        was_training = self.model.training
        self.model.eval()
        chunks_ids, chunks_logprobs = [], []
        try:
            with gathered_for_generation(self.model):  # FSDP2: the full weights once, not per token
                for start in range(0, len(row_prompts), self.generation_batch_size):
                    ids = prompt_ids[start:start + self.generation_batch_size].to(device)
                    mask = prompt_mask[start:start + self.generation_batch_size].to(device)
                    out = unwrap(self.model).generate(input_ids=ids, attention_mask=mask,
                                                      generation_config=generation_config)
                    response = out.sequences[:, width:]
                    logits = torch.stack(out.logits, dim=1).float() / temperature  # [rows, R, V]
                    logprobs = logits.log_softmax(-1).gather(-1, response[..., None]).squeeze(-1)
                    chunks_ids.append(response.cpu())
                    chunks_logprobs.append(logprobs.cpu())
        finally:
            self.model.train(was_training)

        length = max(chunk.shape[1] for chunk in chunks_ids)
        response_ids = torch.cat([torch.nn.functional.pad(c, (0, length - c.shape[1]), value=pad_id)
                                  for c in chunks_ids])
        sampler_logprobs = torch.cat([torch.nn.functional.pad(c, (0, length - c.shape[1]))
                                      for c in chunks_logprobs])
        response_mask, truncated = response_mask_until_eos(response_ids, self.tokenizer.eos_token_id)
        response_ids = response_ids.masked_fill(response_mask == 0, pad_id)
        sampler_logprobs = sampler_logprobs * response_mask
        texts = self.tokenizer.batch_decode(
            [ids[mask.bool()].tolist() for ids, mask in zip(response_ids, response_mask)], skip_special_tokens=True)
        return Rollouts(problems=list(problems), group_size=n, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                        response_ids=response_ids, response_mask=response_mask, sampler_logprobs=sampler_logprobs,
                        response_texts=texts, truncated=truncated, sources=["policy"] * len(row_prompts))


def response_mask_until_eos(response_ids: torch.Tensor, eos_token_id: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """1 on every token up to and including the first EOS; rows without EOS are truncated."""
    eos_ids = eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    is_eos = torch.zeros_like(response_ids, dtype=torch.bool)
    for eos in eos_ids:
        if eos is not None:
            is_eos |= response_ids == eos
    # tokens strictly after the first EOS have a cumulative EOS count that already counted it
    eos_before = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    mask = (~eos_before).float()
    truncated = ~is_eos.any(-1)
    return mask, truncated
