"""A KV cache for the ``hf`` decoding loop that does not copy itself on every token.

transformers' ``DynamicLayer`` appends each step's keys and values with ``torch.cat``, which copies
the whole cache: O(L^2) bytes over a response of L tokens, a growing share of a decoding step as
responses get long. ``PreallocatedLayer`` keeps them in a buffer with room for the whole response,
writes each step's positions in place and hands attention a view of the filled part: the same
values in the same shape as ``cat`` gives, so attention computes the same numbers
(tests/test_rollout_hf.py checks the sampled tokens, log-probs and entropies are bitwise those of
the ``DynamicCache`` path).
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


def preallocated_cache(model: torch.nn.Module, capacity: int) -> Any:
    """The model's own ``DynamicCache`` (its layer types from its config) with every plain
    ``DynamicLayer`` replaced by a ``PreallocatedLayer`` of ``capacity`` positions; None when the
    model has no config (the forward then makes its own cache)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    cache = DynamicCache(config=config)
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in layers]
    return cache


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys`` / ``values`` are views of ``[B, H, capacity, D]`` buffers."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if self._key_buffer is None or end > self._key_buffer.shape[-2]:
            size = 0 if self._key_buffer is None else self._key_buffer.shape[-2]
            self._grow(key_states, value_states, max(end, self.capacity, 2 * size))  # doubling: rare copies
        self._key_buffer[:, :, self.length:end] = key_states
        self._value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self._expose()
        return self.keys, self.values

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, size: int) -> None:
        """New buffers of ``size`` positions holding what is cached so far (once per response unless
        the capacity was too small)."""
        batch, heads = key_states.shape[:2]
        keys = key_states.new_empty(batch, heads, size, key_states.shape[-1])
        values = value_states.new_empty(batch, heads, size, value_states.shape[-1])
        if self.length:
            keys[:, :, :self.length] = self._key_buffer[:, :, :self.length]
            values[:, :, :self.length] = self._value_buffer[:, :, :self.length]
        self._key_buffer, self._value_buffer = keys, values

    def _expose(self) -> None:
        self.keys = self._key_buffer[:, :, :self.length]
        self.values = self._value_buffer[:, :, :self.length]

    def get_seq_length(self) -> int:
        return self.length

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length:
            self._key_buffer = self._key_buffer.repeat_interleave(repeats, dim=0)
            self._value_buffer = self._value_buffer.repeat_interleave(repeats, dim=0)
            self._expose()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length:
            self._key_buffer = self._key_buffer[indices]
            self._value_buffer = self._value_buffer[indices]
            self._expose()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.length:
            self.batch_select_indices(beam_idx.to(self._key_buffer.device))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        self.length = max(0, self.length + tokens_to_remove)
        if self._key_buffer is not None:
            self._expose()

    def reset(self) -> None:
        self.length = 0
        self._key_buffer = self._value_buffer = None
        super().reset()
