"""Load student, teacher and reference models with transformers; check tokenizers agree.

Every model is read from a local directory (``bundled:NAME`` for the shipped demo models).
Weights are read through safetensors; a checkpoint's own Python code runs only when the
recipe sets ``model.trust_remote_code``.
"""
from __future__ import annotations

import json
import pickle
import random
from pathlib import Path
from typing import Any, Optional

import torch

from kdrl.config import ConfigError, ModelConfig
from kdrl.cpu_threads import apply_cpu_threads
from kdrl.paths import path_problem

BUNDLED_PREFIX = "bundled:"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
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
    problem = path_problem(path, "dir")
    if problem and problem != "no such file or directory":
        raise ModelError(f"model '{spec}': {problem}")
    if problem or path_problem(path / "config.json") == "no such file or directory":
        raise ModelError(f"model '{spec}': no config.json in {path.name or spec} "
                         "(give a local directory saved with save_pretrained; nothing is downloaded)")
    problem = path_problem(path / "config.json")
    if problem:
        raise ModelError(f"model '{spec}': its config.json is {problem}")
    return path


def read_model_config(spec: str, path: Path) -> dict:
    """config.json as a mapping; ModelError naming the line when it is not JSON."""
    try:
        values = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelError(f"model '{spec}': config.json is not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise ModelError(f"model '{spec}': config.json is not valid JSON (line {error.lineno}: {error.msg})") from None
    if not isinstance(values, dict):
        raise ModelError(f"model '{spec}': config.json must hold a JSON object")
    return values


def check_model_dir(spec: str, path: Path, trust_remote_code: bool) -> None:
    """Refuse, before transformers reads it, a directory that cannot be a causal LM kdrl trains:
    an unknown or encoder architecture, no weights, or only a LoRA adapter."""
    from transformers import __version__
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import (MODEL_FOR_MASKED_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)

    values = read_model_config(spec, path)
    model_type = values.get("model_type")
    own_code = trust_remote_code and "AutoModelForCausalLM" in (values.get("auto_map") or {})
    if not own_code:
        if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
            raise ModelError(f"model '{spec}': config.json has model_type {model_type!r}, which transformers "
                             f"{__version__} does not know (upgrade transformers, or set model.trust_remote_code="
                             "true if the checkpoint ships its own code and you trust it)")
        if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
            raise ModelError(f"model '{spec}': a '{model_type}' model is an encoder (or encoder-decoder) "
                             "architecture; kdrl trains decoder-only language models (e.g. qwen2, llama)")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        adapter = (path / "adapter_config.json").is_file()
        raise ModelError(f"model '{spec}': " + ("holds a LoRA adapter (adapter_config.json), not a model; give "
                                                "its base model, or merge the adapter into it first" if adapter else
                                                f"no weights file ({WEIGHT_FILES[0]}) in {path.name}"))


def pick_device(name: str = "auto") -> torch.device:
    """``train.device`` as a torch device; ConfigError for a name torch does not know or a device
    this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"train.device: '{name}' is not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"train.device: '{name}', but torch sees no CUDA device here (torch "
                              f"{torch.__version__}); use train.device=cpu or auto")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"train.device: '{name}', but there are only {count} CUDA devices (cuda:0 to "
                              f"cuda:{count - 1})")
    elif device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"train.device: '{name}', but MPS is not available here; use train.device=cpu or auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"train.device: '{name}' is not a device kdrl can train on (use auto, cpu, cuda, "
                          "cuda:N or mps)")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def set_cpu_threads(threads: int, device: torch.device, model: torch.nn.Module) -> None:
    """``train.cpu_threads`` (0 = auto: the fastest counts on a start-up probe, kdrl.cpu_threads);
    nothing on an accelerator."""
    apply_cpu_threads(threads, device, model)


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

    quiet_transformers()
    path = resolve_model_path(spec)
    read_model_config(spec, path)  # AutoTokenizer reads it too, with a traceback when it is not JSON
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"model '{spec}': no tokenizer in {path.name} (none of {', '.join(TOKENIZER_FILES)}); "
                         "save it beside the weights with tokenizer.save_pretrained")
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
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
    check_model_dir(spec, path, config.trust_remote_code)
    dtype = pick_dtype(config.dtype, device)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, trust_remote_code=config.trust_remote_code, use_safetensors=None,
            output_loading_info=True)
    except RuntimeError as error:
        if "ignore_mismatched_sizes" in str(error) or "size mismatch" in str(error):
            raise ModelError(f"model '{spec}': the weights' shapes do not match config.json (the config and the "
                             "weights are of different models)") from None
        raise
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
    missing = [name for name in info.get("missing_keys", []) if name not in _tied_names(model)]
    if missing:  # transformers would train these from random values, silently
        raise ModelError(f"model '{spec}': the weights file has no values for {len(missing)} parameters of this "
                         f"'{model.config.model_type}' model (e.g. '{sorted(missing)[0]}'); config.json and the "
                         "weights are of different architectures")
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


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Parameters that are another's tied copy (an output layer tied to the embeddings)."""
    tied = getattr(model, "_tied_weights_keys", None) or []
    return set(tied.keys() if isinstance(tied, dict) else tied)


def apply_lora(model: torch.nn.Module, config: ModelConfig, adapter: Optional[Path] = None) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    if adapter is not None:
        from peft import PeftModel

        if not (adapter / "adapter_model.safetensors").is_file():
            pickled = (adapter / "adapter_model.bin").is_file()
            raise ModelError(f"LoRA adapter {adapter}: " + ("holds only a pickled adapter_model.bin; kdrl reads "
                                                            "weights from safetensors only (never a pickle)"
                                                            if pickled else "no adapter_model.safetensors"))
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
