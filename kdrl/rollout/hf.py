"""The ``hf`` engine: transformers' ``generate`` with left padding, one prefill per prompt group and
per-token sampler log-probs taken from the generation itself."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from transformers import LogitsProcessorList

from kdrl.distributed import gathered_for_generation
from kdrl.models import position_ids_from_mask, unwrap
from kdrl.rollout import SamplingParams
from kdrl.rollout.rows import left_pad
from kdrl.types import Problem, Rollouts


class SamplerLogprobs:
    """A logits processor that takes pi_old from ``generate``'s own logits: no extra forward pass.

    It is the only processor, so it sees the raw logits of every step. It keeps
    log softmax(logits / T) of the current step and returns it, nucleus-truncated, as the scores
    ``generate`` samples from: sampling is then exactly temperature T with top-p. At the next step
    (and at the end, from the final sequences) it reads the log-prob of the token that was chosen,
    so it holds one [rows, V] tensor, never [rows, R, V]. The recorded pi_old is the untruncated
    softmax(logits / T), the same function the trainer recomputes (top-p is a sampling device, not
    part of pi_old, as in verl and TRL).
    """

    def __init__(self, temperature: float, top_p: float):
        from transformers import TopPLogitsWarper

        self.temperature = temperature
        self.top_p = TopPLogitsWarper(top_p) if top_p < 1.0 else None
        self.pending: Optional[torch.Tensor] = None
        self.chosen: list[torch.Tensor] = []
        self.entropy: list[torch.Tensor] = []  # H(pi_old) at each position (token selection, e.g. tip)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.pending is not None:
            self.chosen.append(self.pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        self.entropy.append(-(self.pending.exp() * self.pending).nan_to_num().sum(-1))
        return self.top_p(input_ids, self.pending) if self.top_p is not None else self.pending

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """[rows, R] log-probs of the generated tokens."""
        if self.pending is not None:
            self.chosen.append(self.pending.gather(-1, sequences[:, -1:]).squeeze(-1))
        return torch.stack(self.chosen, dim=1) if self.chosen else torch.zeros(sequences.shape[0], 0)

    def entropies(self, rows: int) -> torch.Tensor:
        """[rows, R] entropy of the sampling distribution at each generated position."""
        return torch.stack(self.entropy, dim=1) if self.entropy else torch.zeros(rows, 0)


class HFRolloutEngine:
    """G samples per prompt with ``model.generate``, each prompt prefilled once for its group.

    transformers' ``num_return_sequences`` repeats the prompt G times BEFORE the prefill
    (``_expand_inputs_for_generation`` runs ahead of ``_prefill`` in ``generate``), so here every
    prompt but its last token runs through the model once, its KV cache is repeated G times
    (``Cache.batch_repeat_interleave``), and ``generate`` continues from it: the prefill costs 1/G.
    Sequences stop at EOS one by one (``generate`` pads finished rows and ends when all are done);
    sampler log-probs come from the generation's own logits (``SamplerLogprobs``).
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
        # the sampler a different distribution from the policy being trained. Temperature and top-p
        # are applied by SamplerLogprobs, so generate adds no processor of its own.
        return GenerationConfig(
            do_sample=not greedy, temperature=None, top_p=None, top_k=None if greedy else 0,
            max_new_tokens=sampling.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id, bos_token_id=self.tokenizer.bos_token_id,
            return_dict_in_generate=True, use_cache=True)

    @torch.no_grad()
    def generate(self, problems: list[Problem], n: int, sampling: SamplingParams, step: int = 0,
                 prompt_suffixes: Optional[list[str]] = None) -> Rollouts:
        device = next(self.model.parameters()).device
        suffixes = prompt_suffixes or [""] * len(problems)
        prompts = [self.encode(problem, suffix) for problem, suffix in zip(problems, suffixes)]
        pad_id = self.tokenizer.pad_token_id
        group_ids, group_mask = left_pad(prompts, pad_id)
        width = group_ids.shape[1]
        prompt_ids, prompt_mask = group_ids.repeat_interleave(n, 0), group_mask.repeat_interleave(n, 0)

        generation_config = self._generation_config(sampling)
        temperature = sampling.temperature if sampling.temperature > 0 else 1.0
        prompts_per_batch = max(1, self.generation_batch_size // n)  # whole groups per generate call
        was_training = self.model.training
        self.model.eval()
        chunks_ids, chunks_logprobs, chunks_entropy = [], [], []
        try:
            with gathered_for_generation(self.model):  # FSDP2: the full weights once, not per token
                for start in range(0, len(prompts), prompts_per_batch):
                    ids = group_ids[start:start + prompts_per_batch].to(device)
                    mask = group_mask[start:start + prompts_per_batch].to(device)
                    recorder = SamplerLogprobs(temperature, sampling.top_p if sampling.temperature > 0 else 1.0)
                    out = unwrap(self.model).generate(
                        input_ids=ids.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0),
                        cache=self._prefill(ids, mask, n), generation_config=generation_config,
                        logits_processor=LogitsProcessorList([recorder]))
                    chunks_ids.append(out.sequences[:, width:].cpu())
                    chunks_logprobs.append(recorder.finish(out.sequences).cpu())
                    chunks_entropy.append(recorder.entropies(out.sequences.shape[0]).cpu())
        finally:
            self.model.train(was_training)

        length = max(chunk.shape[1] for chunk in chunks_ids)
        response_ids = torch.cat([torch.nn.functional.pad(c, (0, length - c.shape[1]), value=pad_id)
                                  for c in chunks_ids])
        sampler_logprobs = torch.cat([torch.nn.functional.pad(c, (0, length - c.shape[1]))
                                      for c in chunks_logprobs])
        sampler_entropy = torch.cat([torch.nn.functional.pad(c, (0, length - c.shape[1]))
                                     for c in chunks_entropy])
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
        """Nothing to copy: ``generate`` runs the live student."""

    def _prefill(self, ids: torch.Tensor, mask: torch.Tensor, n: int) -> Any:
        """The KV cache of each prompt but its last token, computed once and repeated for its n rows
        (None when there is nothing to prefill); ``generate`` then runs only the last prompt token."""
        if ids.shape[1] < 2:
            return None
        model = unwrap(self.model)
        out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                    position_ids=position_ids_from_mask(mask[:, :-1]), use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        if n > 1:
            cache.batch_repeat_interleave(n)
        return cache


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
