"""Load student, teacher and reference models with transformers; check tokenizers agree.

Every model is read from a local directory (``bundled:NAME`` for the shipped demo models).
Weights are read through safetensors; a checkpoint's own Python code runs only when the
recipe sets ``model.trust_remote_code``.
"""
from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any, Optional

import torch

from kdrl.config import ModelConfig

BUNDLED_PREFIX = "bundled:"
# Token-level terms compare log-probs of the same ids, so the tokenizers must agree on these.
PROBE_TEXT = "Compute 12+7*3. Step 1: 7*3=21. \\boxed{33}\n"


class ModelError(ValueError):
    """A model or tokenizer cannot be used as asked; the message says which and why."""


def bundled_model_dir(name: str) -> Path:
    return Path(__file__).parent / "assets" / "demo" / name


def resolve_model_path(spec: str) -> Path:
    if spec.startswith(BUNDLED_PREFIX):
        path = bundled_model_dir(spec[len(BUNDLED_PREFIX):])
    else:
        path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise ModelError(f"model '{spec}': no config.json in {path.name or spec} "
                         "(give a local directory saved with save_pretrained; nothing is downloaded)")
    return path


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def set_cpu_threads(threads: int, device: torch.device, model: torch.nn.Module) -> None:
    """``train.cpu_threads`` (0 = auto: one thread for a model under 50M parameters, torch's
    default otherwise); nothing on an accelerator."""
    if device.type != "cpu":
        return
    if threads == 0:
        if sum(p.numel() for p in model.parameters()) >= 50_000_000:
            return
        threads = 1
    torch.set_num_threads(threads)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # bf16 on a GPU that has it, float32 on CPU
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def quiet_transformers() -> None:
    """Per-file loading bars would drown kdrl's own progress bar."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(spec)), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelError(f"tokenizer of '{spec}' has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token  # the response mask, not the pad id, marks padding
    tokenizer.padding_side = "left"  # prompts are left padded so responses start at one column
    return tokenizer


def load_model(spec: str, config: ModelConfig, device: torch.device, trainable: bool,
               adapter: Optional[Path] = None) -> torch.nn.Module:
    """``adapter``: a saved LoRA adapter to continue training (resume) instead of a fresh one."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    path = resolve_model_path(spec)
    dtype = pick_dtype(config.dtype, device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, trust_remote_code=config.trust_remote_code, use_safetensors=None)
    except ValueError as error:
        if "trust_remote_code" in str(error):
            raise ModelError(f"model '{spec}' needs its own code; set model.trust_remote_code=true "
                             "only if you trust it") from None
        raise
    except pickle.UnpicklingError:  # a pickled .bin that holds more than tensors is never run
        raise ModelError(f"model '{spec}': its pytorch_model.bin holds objects that are not plain tensors; "
                         "kdrl reads weights only (convert the checkpoint to safetensors)") from None
    except Exception as error:
        if type(error).__name__ == "SafetensorError":  # truncated or corrupt weights file
            raise ModelError(f"model '{spec}': unreadable safetensors weights ({error})") from None
        raise
    model.to(device)
    if trainable:
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.lora.enabled:
            model = apply_lora(model, config, adapter)
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)
    # Training uses no dropout: sampler and learner must be the same function for exact ratios.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def apply_lora(model: torch.nn.Module, config: ModelConfig, adapter: Optional[Path] = None) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    if adapter is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=list(config.lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def check_tokenizers_compatible(student_tokenizer: Any, other_tokenizer: Any, other_name: str,
                                student_model: Optional[torch.nn.Module] = None,
                                other_model: Optional[torch.nn.Module] = None) -> None:
    """Raise ``ModelError`` unless token ids mean the same thing for both (METHODS.md, Notation)."""
    problems = []
    if len(student_tokenizer) != len(other_tokenizer):
        problems.append(f"vocabulary size {len(student_tokenizer)} vs {len(other_tokenizer)}")
    probe_student = student_tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    probe_other = other_tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if probe_student != probe_other:
        problems.append("the probe text tokenizes to different ids")
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        a, b = getattr(student_tokenizer, name), getattr(other_tokenizer, name)
        if a != b and not (name == "pad_token_id"):
            problems.append(f"{name} {a} vs {b}")
    if student_model is not None and other_model is not None:
        va = student_model.get_output_embeddings().weight.shape[0]
        vb = other_model.get_output_embeddings().weight.shape[0]
        if va != vb:
            problems.append(f"output vocabulary {va} vs {vb} rows")
    if problems:
        raise ModelError(f"the student and the {other_name} do not share a tokenizer: " + "; ".join(problems)
                         + ". Token-level KD compares log-probs of the same ids, so they must match.")


def context_length(model: torch.nn.Module) -> Optional[int]:
    return getattr(model.config, "max_position_embeddings", None)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside peft / FSDP / DDP wrappers."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Left padding shifts positions; count them from each row's first real token, as generate does."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_hidden_states(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           prompt_width: int) -> torch.Tensor:
    """Final hidden states at the positions that predict each response token: [B, R, H].

    Runs the decoder without the output projection, so full [B, L, V] logits are never made;
    the objective projects chunk by chunk.
    """
    # peft injects LoRA layers into the same modules, so the unwrapped backbone includes them.
    # Under FSDP2 the decoder runs through the root's registered forward method (kdrl.distributed).
    decoder = getattr(model, "kdrl_decoder_forward", None) or unwrap(model).base_model
    outputs = decoder(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    return hidden[:, prompt_width - 1:-1]


def output_projection(model: torch.nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    head = unwrap(model).get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def logit_scale(model: torch.nn.Module) -> float:
    """Some architectures scale logits after the projection; they must be honoured in every term."""
    config = unwrap(model).config
    if getattr(config, "final_logit_softcapping", None):
        raise ModelError("models with final_logit_softcapping are not supported yet by the chunked loss")
    return float(getattr(config, "logit_scale", 1.0) or 1.0)


@torch.no_grad()
def token_logprobs_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                               token_ids: torch.Tensor, chunk_size: int = 1024,
                               scale: float = 1.0) -> torch.Tensor:
    """log softmax(h W^T + b)[token] for every position, ``chunk_size`` rows of logits at a time."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_ids = token_ids.reshape(-1)
    out = torch.empty(flat_ids.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, flat_ids.shape[0], chunk_size):
        logits = torch.nn.functional.linear(flat_hidden[start:start + chunk_size], weight, bias).float() * scale
        out[start:start + chunk_size] = logits.log_softmax(-1).gather(
            -1, flat_ids[start:start + chunk_size, None]).squeeze(-1)
    return out.view(token_ids.shape)
