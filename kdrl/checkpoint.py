"""Atomic checkpoints and exact resume.

A checkpoint is written to a temporary directory and renamed into place only when complete, so
a kill at any moment leaves the previous checkpoint whole. It holds the student in Hugging Face
format (loadable by ``AutoModelForCausalLM.from_pretrained``) and the trainer state: optimizer,
scheduler, step, data order and every random generator state.
"""
from __future__ import annotations

import copy
import errno
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from kdrl.models import unwrap

COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "trainer_state.pt"
TEMP_PREFIX = ".tmp-step-"  # a save in progress (or killed mid-way)
RETIRED_PREFIX = ".old-step-"  # the previous copy of a step being re-saved


class CheckpointError(ValueError):
    pass


# errno values that mean "this file system takes no more": full, over quota, over the file-size limit
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DISK_FULL_WORDS = ("no space left", "file too large", "quota exceeded", "os error 28", "os error 27",
                    "os error 122", "file write failed")  # safetensors and torch.save wrap the OSError


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (an OSError, or a library's wrapper of one) says the disk took no more."""
    if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
        return True
    return any(words in str(error).lower() for words in _DISK_FULL_WORDS)


def disk_full_message(where: Optional[Path], error: BaseException) -> str:
    detail = str(error).splitlines()[0] if str(error) else type(error).__name__
    place = f"{where}: the disk is full" if where is not None else "the disk is full"
    return f"{place} (or a file-size limit, ulimit -f, was reached): {detail}"


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
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_model(model: torch.nn.Module, tokenizer: Any, path: Path,
               state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Hugging Face format; a LoRA student is saved merged, plus its adapter. ``state_dict``: the
    full weights gathered from several processes (kdrl.distributed), saved in place of the module's."""
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        model.save_pretrained(str(path / "adapter"))
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(str(path), safe_serialization=True)
    else:
        unwrap(model).save_pretrained(str(path), safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(str(path))


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, tokenizer: Any,
                    trainer_state: dict[str, Any], keep_last: int,
                    state_dict: Optional[dict[str, torch.Tensor]] = None) -> Path:
    """Write ``step-NNNNNNNN`` atomically: a temporary directory, fsynced, then renamed into place.

    The random generator states are taken first, before anything is written, so they are the
    ones of the checkpoint moment. A kill at any point leaves every earlier checkpoint whole;
    a half-written temporary directory is ignored by ``latest_checkpoint`` and removed by the
    next save.
    """
    state = {**trainer_state, "step": step}
    state.setdefault("rng", rng_state())
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    temporary = root / f"{TEMP_PREFIX}{step:08d}-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    try:
        temporary.mkdir()
        save_model(model, tokenizer, temporary, state_dict=state_dict)
        torch.save(state, temporary / STATE_FILE)
        _fsync_tree(temporary)
        (temporary / COMPLETE_MARKER).write_text(str(step))  # written last: its presence means complete
        _fsync(temporary / COMPLETE_MARKER)
        _fsync(temporary)
    except Exception as error:
        shutil.rmtree(temporary, ignore_errors=True)  # give the space back; earlier checkpoints are untouched
        if not is_disk_full(error):
            raise
        previous = latest_checkpoint(run_dir)
        kept = f"; {previous.name} is complete and --resume continues from it" if previous else ""
        raise CheckpointError(disk_full_message(final, error) + kept) from None
    if final.exists():  # re-saving a step: retire the old copy by rename, never delete it first
        retired = root / f"{RETIRED_PREFIX}{step:08d}-{os.getpid()}"
        if retired.exists():
            shutil.rmtree(retired)
        os.replace(final, retired)
        os.replace(temporary, final)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(temporary, final)
    _fsync(root)
    prune_checkpoints(run_dir, keep_last)
    return final


def link_final(run_dir: Path, checkpoint: Path) -> None:
    """Point ``run_dir/final`` at ``checkpoint``, atomically (a new link renamed over the old one)."""
    final = run_dir / "final"
    temporary = run_dir / f".final-{os.getpid()}"
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    temporary.symlink_to(checkpoint.relative_to(run_dir))
    os.replace(temporary, final)


def _fsync_tree(path: Path) -> None:
    """Flush the files and directories under ``path`` to disk (a rename is only as durable as its content)."""
    for item in sorted(path.rglob("*")):
        if not item.is_symlink():
            _fsync(item)
    _fsync(path)


def _fsync(path: Path) -> None:
    """Flush one file or directory entry list to disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # a file system without fsync on directories


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / COMPLETE_MARKER).is_file() and (path / STATE_FILE).is_file()


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete ``step-N`` directories, oldest first; temporary and retired ones are never listed."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        number = path.name[len("step-"):]
        if path.name.startswith("step-") and number.isdigit() and is_complete(path):
            found.append((int(number), path))
    return [path for _, path in sorted(found)]


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; remove leftovers of killed saves."""
    for stale in complete_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    mine = f"-{os.getpid()}"
    for prefix in (TEMP_PREFIX, RETIRED_PREFIX):
        for leftover in checkpoint_dir(run_dir).glob(f"{prefix}*"):
            if not leftover.name.endswith(mine):  # another (dead) process's half-written save
                shutil.rmtree(leftover, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def load_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint ``path``; ``weights_only``: a checkpoint is data, never code."""
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol notes on a damaged file: the error says it
            warnings.simplefilter("ignore")
            return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupt, or holding objects that are not plain data
        raise CheckpointError(f"{path / STATE_FILE}: cannot be read ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else 'no detail'})") from None
