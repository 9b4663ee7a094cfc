"""The bundle's tokenizer (one token per byte) and its tiny Qwen2 models, freshly initialised.

``build_tokenizer`` and ``make_model`` also build the test fixtures, which use the older
chains-mod10 task: keep them unchanged (the shipped bundle was made with them).
"""
from __future__ import annotations

import torch

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|eos|>"


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
