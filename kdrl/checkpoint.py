"""Atomic checkpoints and exact resume.

A checkpoint is written to a temporary directory and renamed into place only when complete, so
a kill at any moment leaves the previous checkpoint whole. It holds the student in Hugging Face
format (loadable by ``AutoModelForCausalLM.from_pretrained``) and the trainer state: optimizer,
scheduler, step, data order and every random generator state.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.pt"


class CheckpointError(ValueError):
    pass


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model(model: torch.nn.Module, tokenizer: Any, path: Path) -> None:
    """Hugging Face format; a LoRA student is saved merged, plus its adapter."""
    from kdrl.models import unwrap

    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        model.save_pretrained(str(path / "adapter"))
        import copy

        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(str(path), safe_serialization=True)
    else:
        unwrap(model).save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, tokenizer: Any,
                    trainer_state: dict[str, Any], keep_last: int) -> Path:
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    temporary = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    save_model(model, tokenizer, temporary)
    torch.save({**trainer_state, "step": step, "rng": rng_state()}, temporary / STATE_FILE)
    (temporary / COMPLETE_MARKER).write_text(str(step))
    _fsync_dir(temporary)
    if final.exists():  # re-saving the same step (e.g. the final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(temporary, final)
    _fsync_dir(root)
    prune_checkpoints(run_dir, keep_last)
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
             and (p / COMPLETE_MARKER).is_file() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    for stale in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    for leftover in checkpoint_dir(run_dir).glob(".tmp-step-*"):
        if str(os.getpid()) not in leftover.name:
            shutil.rmtree(leftover, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def load_trainer_state(path: Path) -> dict[str, Any]:
    # weights_only: a checkpoint is data, never code
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
