"""Data-parallel training with torchrun and FSDP2; every helper is a no-op on one process.

    torchrun --nproc_per_node N -m kdrl train RECIPE ...      (one process per device)

Each rank generates, rewards and scores ITS share of the step's prompts (whole groups, so the
group advantages need no communication); the objective's normalisers are summed over ranks
(``Objective(all_reduce_sum=...)``), so each rank's loss is its share of ONE global mean and
the gradients are SUMMED over ranks (FSDP2's default average is turned off): the update equals
the one-process update on the same global batch. The student is sharded with FSDP2
(``fully_shard`` per decoder layer, then the root); the teacher is replicated on every rank.
Checkpoints gather full weights and a full optimizer state and are written once, by rank 0, in
Hugging Face format, so a run resumes with any number of processes.
"""
from __future__ import annotations

import os
import types
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from kdrl.config import ConfigError
from kdrl.models import pick_device, unwrap

HIDDEN_METHOD = "kdrl_decoder_forward"  # the decoder without the output projection, run under FSDP's hooks


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (identity on one process); differentiable tensors are not expected here."""
        if not self.enabled:
            return value
        out = value.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` holds on some rank: one decision, taken together, for
        code that must make the same collective calls on every rank."""
        return bool(self.all_reduce_sum(torch.tensor(float(flag))) > 0)

    def share(self, count: int) -> slice:
        """This rank's contiguous share of ``count`` items; ``count`` must divide evenly."""
        if count % self.world_size:
            raise ValueError(f"{count} items do not split evenly over {self.world_size} processes")
        size = count // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's value on every rank (a run directory, say)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_distributed(device_name: str = "auto") -> tuple[Distributed, torch.device]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); gloo on CPU, nccl on GPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), pick_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30),
                                **({"device_id": device} if use_cuda else {}))
    return Distributed(rank, world_size, local_rank), device


def close_distributed() -> None:
    """Every rank reaches teardown before any closes its connections: a gloo rank whose peer has
    already destroyed the group can abort (SIGABRT) at exit. The wait is bounded, so a rank that
    stopped on an error never waits for one that cannot come."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        with suppress(Exception):  # a peer that never comes: tear down anyway
            dist.monitored_barrier(timeout=timedelta(seconds=30))
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- FSDP2


def shard_model(model: torch.nn.Module, info: Distributed) -> torch.nn.Module:
    """FSDP2: each decoder layer its own unit, the rest (embeddings, final norm, head) in the root.

    The decoder-only forward (hidden states for the chunked loss) and ``generate`` are registered
    as FSDP forward methods, so they gather the weights they use; the output projection is read
    after that forward, while the root is still unsharded, and its gradient is reduced with the rest.
    """
    if not info.enabled:
        return model
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if hasattr(model, "peft_config"):
        raise ConfigError("model.lora.enabled: LoRA with several processes is not supported yet (FSDP2 + peft); "
                          "run it in one process")
    inner = unwrap(model)
    layers = getattr(inner.base_model, "layers", None)
    for layer in layers if layers is not None else []:
        fully_shard(layer)
    fully_shard(model)
    for module in fsdp_modules(model):  # every unit reduces by SUM: each rank's loss is its share of the global mean
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    setattr(model, HIDDEN_METHOD, types.MethodType(_decoder_forward, model))
    register_fsdp_forward_method(model, HIDDEN_METHOD)
    register_fsdp_forward_method(model, "generate")
    return model


def _decoder_forward(self: torch.nn.Module, **kwargs: Any) -> Any:
    return unwrap(self).base_model(**kwargs)


def fsdp_modules(model: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered_for_generation(model: torch.nn.Module):
    """Full weights on every rank for the whole of ``generate``: one all-gather per unit, not one
    per decoding step, and ranks that stop early (EOS) need not wait for the others' collectives."""
    modules = fsdp_modules(model)
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            # FSDP2's defaults again: the root keeps its weights (the output projection is read after
            # its forward, by the chunked loss); the layers reshard after forward
            module.set_reshard_after_forward(module is not model, recurse=False)


def grad_norm_value(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s total norm as a float (a DTensor under FSDP2)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# ----------------------------------------------------------------------------- checkpoints


def full_model_state(model: torch.nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """The full (unsharded) weights on CPU, for rank 0's Hugging Face save; None = the module's own."""
    if not fsdp_modules(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # a tied output projection is one parameter: saved once, under its first name, as save_pretrained does
    kept = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_buffers()}
    return {name: value for name, value in state.items() if name in kept}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Optimizer state keyed by parameter name, unsharded: loadable with any number of processes."""
    if not fsdp_modules(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a state from ``full_optimizer_state``: keyed by parameter names (written by several
    processes) or by position (one process), into a sharded or a plain model."""
    keyed_by_name = any(isinstance(key, str) for key in state.get("state", {})) or \
        any(isinstance(p, str) for group in state.get("param_groups", []) for p in group.get("params", []))
    if not keyed_by_name and not fsdp_modules(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not keyed_by_name:  # positions -> names, in the order the optimizer lists its parameters
        names = {id(p): name for name, p in model.named_parameters()}
        order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
        state = {"state": {order[int(k)]: v for k, v in state["state"].items()},
                 "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]}
                                  for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------- metrics

class SumOverRanks(float):
    """A metric each rank holds a share of (an objective term: its share of one global weighted
    mean; tokens per second: its own tokens over its own time): reduced by sum."""


class MaxOverRanks(float):
    """A metric where the slowest rank sets the pace (a phase's wall time): reduced by max."""


def reduce_metrics(metrics: dict[str, Any], info: Distributed) -> dict[str, Any]:
    """Rank metrics -> run metrics, each by the reduction it carries (SumOverRanks, MaxOverRanks);
    plain numbers are averaged (per-rank means over equal shares). Non-numeric values are rank 0's."""
    if not info.enabled:
        return metrics
    keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    summed = values.clone()
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    maxed = values.clone()
    dist.all_reduce(maxed, op=dist.ReduceOp.MAX)
    out = dict(metrics)
    for i, key in enumerate(keys):
        if isinstance(metrics[key], SumOverRanks):
            out[key] = float(summed[i])
        elif isinstance(metrics[key], MaxOverRanks):
            out[key] = float(maxed[i])
        else:
            out[key] = float(summed[i]) / info.world_size
    return out
