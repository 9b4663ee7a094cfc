"""Lightning OPD (METHODS.md §6 ``lightning_opd``): responses sampled once, teacher scored once.

``kdrl cache-teacher RECIPE [key=value ...] --out DIR`` samples ``teacher_cache.num_prompts``
prompts of ``data.train`` (in the run's data order) ``rollout.group_size`` times from the
INITIAL student, scores every response token with the teacher, and writes

    DIR/rollouts.safetensors   prompt/response ids and masks, the sampler's and the teacher's
                               per-token log-probs, rows grouped by prompt
    DIR/manifest.json          sha256 of the student's and the teacher's model files, of the
                               data file and of rollouts.safetensors, the sampling settings, the
                               problem ids

The directory is built beside DIR under a temporary name and renamed into place when complete,
so a build killed midway leaves the previous cache whole (never a manifest beside other rollouts).

Training with ``teacher_cache.path=DIR`` loads no teacher: the cache replays the stored
responses (``kdrl.rollout.sources.CachedRollouts``) and their teacher log-probs (``CachedTeacher``). A cache
whose manifest does not match the run is refused, naming the field that differs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from kdrl.config import Config, ConfigError
from kdrl.data import PromptSampler, load_problems, make_encoder, resolve_data_path
from kdrl.models import (check_tokenizers_compatible, load_model, load_tokenizer, pick_device, resolve_model_path,
                         seed_everything, set_cpu_threads)
from kdrl.rollout import SamplingParams, engine_options, make_engine
from kdrl.rollout.rows import pack, unpack
from kdrl.teachers.base import Teacher
from kdrl.teachers.local import make_scorer
from kdrl.types import Problem, Rollouts, TeacherOutput

ROLLOUTS_FILE = "rollouts.safetensors"
MANIFEST_FILE = "manifest.json"
MODEL_FILES = ("config.json", "*.safetensors", "pytorch_model*.bin")  # what makes the model, not its tokenizer
FORMAT = 1


class TeacherCacheError(ConfigError):
    """The cache is missing or was made for another run; the message says how to rebuild it."""


# --------------------------------------------------------------------------- fingerprints

def sha256_of_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def model_sha256(spec: str) -> str:
    folder = resolve_model_path(spec)
    return sha256_of_files(sorted({p for pattern in MODEL_FILES for p in folder.glob(pattern)}))


def data_sha256(spec: str) -> str:
    path = resolve_data_path(spec)
    return sha256_of_files(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])


def expected_manifest(config: Config) -> dict[str, Any]:
    """What a cache for this run must record (everything but the problem ids)."""
    return {
        "student": model_sha256(config.model.student),
        "teacher": model_sha256(config.model.teacher) if config.model.teacher else None,
        "data": data_sha256(config.data.train),
        "sampling": {
            "num_prompts": config.teacher_cache.num_prompts, "group_size": config.rollout.group_size,
            "temperature": config.rollout.temperature, "top_p": config.rollout.top_p,
            "max_new_tokens": config.rollout.max_new_tokens, "seed": config.train.seed,
            "shuffle": config.data.shuffle, "prompt_template": config.data.prompt_template,
            "chat_template": config.data.chat_template, "system_prompt": config.data.system_prompt,
        },
    }


def build_command(config: Config, path: str) -> str:
    return f"kdrl cache-teacher recipes/{config.name}.yaml --out {path}"


def mismatches(recorded: dict[str, Any], expected: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    out = []
    for key, value in expected.items():
        if isinstance(value, dict):
            out += mismatches(recorded.get(key) or {}, value, f"{prefix}{key}.")
        elif recorded.get(key) != value:
            out.append((prefix + key, recorded.get(key), value))
    return out


# --------------------------------------------------------------------------- building

def build_teacher_cache(config: Config, out: Optional[str] = None) -> Path:
    """Sample, score and write the cache (``kdrl cache-teacher``); returns its directory."""
    target = out or config.teacher_cache.path
    if not target:
        raise ConfigError("teacher_cache.path: give the cache directory (--out DIR or teacher_cache.path=DIR)")
    if config.model.teacher is None:
        raise ConfigError("model.teacher: a teacher is needed to build a teacher cache")
    folder = Path(target)
    if folder.is_symlink() or folder.exists():  # checked before anything is sampled
        if not folder.is_dir():
            raise ConfigError(f"--out {folder}: exists and is not a directory; give a new or a cache directory")
        if any(folder.iterdir()) and not (folder / MANIFEST_FILE).is_file():
            raise ConfigError(f"--out {folder}: a directory that is not a teacher cache (no {MANIFEST_FILE}); "
                              "give a new directory, nothing in this one is replaced")
    seed_everything(config.train.seed)
    device = pick_device(config.train.device)
    tokenizer = load_tokenizer(config.model.student, config.model.trust_remote_code)
    problems = load_problems(config.data.train, config.data.prompt_field, config.data.answer_field,
                             config.data.solution_field)
    manifest = expected_manifest(config)  # hashed before sampling: the inputs as they were read
    order = PromptSampler(len(problems), config.train.seed, config.data.shuffle)
    chosen = [problems[i] for i in order.next(min(config.teacher_cache.num_prompts, len(problems)))]
    student = load_model(config.model.student, config.model, device, trainable=False)
    teacher = load_model(config.model.teacher, config.model, device, trainable=False)
    check_tokenizers_compatible(tokenizer, load_tokenizer(config.model.teacher, config.model.trust_remote_code),
                                "teacher", student, teacher)
    set_cpu_threads(config.train.cpu_threads, device, student)
    engine = make_engine(config.rollout.engine, model=student, tokenizer=tokenizer,
                         encode=make_encoder(tokenizer, config, config.data.max_prompt_tokens),
                         generation_batch_size=config.rollout.generation_batch_size,
                         **engine_options(config.rollout.engine, config.rollout.vllm, config.train.seed,
                                          make_scorer(student, config)))
    scorer = make_scorer(teacher, config)
    sampling = SamplingParams(config.rollout.temperature, config.rollout.top_p, config.rollout.max_new_tokens)
    size = config.rollout.group_size
    per_call = max(1, config.rollout.generation_batch_size // size)
    rows, teacher_rows = [], []
    for start in range(0, len(chosen), per_call):
        rollouts = engine.generate(chosen[start:start + per_call], size, sampling)
        teacher_logprobs = scorer.score(rollouts).token_logprobs
        for b, row in enumerate(unpack(rollouts)):
            rows.append(row)
            teacher_rows.append(teacher_logprobs[b, :len(row.response_ids)])
    packed = pack(rows, chosen, size, tokenizer.pad_token_id)
    teacher_logprobs = torch.zeros_like(packed.sampler_logprobs)
    for b, values in enumerate(teacher_rows):
        teacher_logprobs[b, :len(values)] = values
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        save_file({"prompt_ids": packed.prompt_ids, "prompt_mask": packed.prompt_mask,
                   "response_ids": packed.response_ids, "response_mask": packed.response_mask,
                   "sampler_logprobs": packed.sampler_logprobs.contiguous(), "teacher_logprobs": teacher_logprobs,
                   "truncated": packed.truncated}, str(temporary / ROLLOUTS_FILE))
        manifest.update({"format": FORMAT, "student_path": config.model.student, "teacher_path": config.model.teacher,
                         "data_path": config.data.train, "problem_ids": [p.id for p in chosen],
                         "rollouts_sha256": sha256_of_files([temporary / ROLLOUTS_FILE])})
        (temporary / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        replace_directory(temporary, folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return folder


def replace_directory(new: Path, folder: Path) -> None:
    """Put the complete directory ``new`` at ``folder``: the old one is renamed aside first and
    removed only after the new one is in place, so ``folder`` is always one whole cache."""
    for path in (*new.iterdir(), new):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if folder.is_dir():
        retired = folder.parent / f".{folder.name}.old-{os.getpid()}"
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(folder, retired)
        os.replace(new, folder)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(new, folder)


# --------------------------------------------------------------------------- reading

class TeacherCache:
    """The stored rollouts of one cache, checked against the run that reads it."""

    def __init__(self, folder: Path, tensors: dict[str, torch.Tensor], problems: list[Problem], group_size: int,
                 texts: list[str], recompute_old: bool):
        self.folder, self.tensors, self.problems, self.group_size = folder, tensors, problems, group_size
        self.texts, self.recompute_old = texts, recompute_old
        self.index = {problem.id: g for g, problem in enumerate(problems)}

    def rows_of(self, problems: list[Problem]) -> torch.Tensor:
        size = self.group_size
        return torch.tensor([self.index[p.id] * size + j for p in problems for j in range(size)])


def load_teacher_cache(config: Config, train_problems: list[Problem], tokenizer: Any) -> TeacherCache:
    """The cache at ``teacher_cache.path``, refused with a one-line error if missing or not this run's."""
    path = config.teacher_cache.path
    folder = Path(path)
    command = build_command(config, path)
    if not (folder / MANIFEST_FILE).is_file() or not (folder / ROLLOUTS_FILE).is_file():
        raise TeacherCacheError(f"teacher_cache.path={path}: no teacher cache there; build it first with: {command}")
    try:
        recorded = json.loads((folder / MANIFEST_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TeacherCacheError(f"teacher_cache.path={path}: unreadable {MANIFEST_FILE}; rebuild it with: "
                                f"{command}") from None
    found = mismatches(recorded, expected_manifest(config))
    if found:
        key, was, now = found[0]
        short = (lambda v: v[:12] if isinstance(v, str) and len(v) == 64 else v)  # sha256 digests: a prefix
        raise TeacherCacheError(f"teacher_cache.path={path}: the cache does not match this run: {key} is "
                                f"{short(was)!r} in the cache but {short(now)!r} here; rebuild it with: {command} "
                                "(and this run's key=value overrides)")
    by_id = {problem.id: problem for problem in train_problems}
    missing = [i for i in recorded["problem_ids"] if i not in by_id]
    if missing:
        raise TeacherCacheError(f"teacher_cache.path={path}: problem '{missing[0]}' is not in data.train; "
                                f"rebuild it with: {command}")
    tensors = read_rollouts(folder, recorded, config.rollout.group_size, f"teacher_cache.path={path}", command)
    mask = tensors["response_mask"]
    texts = tokenizer.batch_decode([ids[m.bool()].tolist() for ids, m in zip(tensors["response_ids"], mask)],
                                   skip_special_tokens=True)
    return TeacherCache(folder, tensors, [by_id[i] for i in recorded["problem_ids"]], config.rollout.group_size,
                        texts, config.teacher_cache.old_logprobs == "recompute")


ROLLOUT_TENSORS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "sampler_logprobs",
                   "teacher_logprobs", "truncated")


def read_rollouts(folder: Path, recorded: dict[str, Any], group_size: int, where: str,
                  command: str) -> dict[str, torch.Tensor]:
    """rollouts.safetensors, checked against its manifest: the recorded sha256 (caches built since it
    is recorded), the tensors and one group of ``group_size`` rows per recorded problem."""
    def refuse(why: str) -> TeacherCacheError:
        return TeacherCacheError(f"{where}: {ROLLOUTS_FILE} {why}; rebuild the cache with: {command}")

    digest = recorded.get("rollouts_sha256")
    if digest is not None and sha256_of_files([folder / ROLLOUTS_FILE]) != digest:
        raise refuse("is not the one its manifest describes (a rebuild was interrupted, or a file was copied in)")
    try:
        tensors = load_file(str(folder / ROLLOUTS_FILE))
    except Exception as error:  # truncated or not safetensors
        raise refuse(f"cannot be read ({str(error).splitlines()[0] if str(error) else type(error).__name__})") \
            from None
    missing = [name for name in ROLLOUT_TENSORS if name not in tensors]
    if missing:
        raise refuse(f"has no '{missing[0]}'")
    rows = len(recorded.get("problem_ids") or []) * group_size
    counts = {name: tensors[name].shape[0] for name in ROLLOUT_TENSORS}
    if any(count != rows for count in counts.values()):
        name = next(name for name, count in counts.items() if count != rows)
        raise refuse(f"holds {counts[name]} rows of '{name}', but its manifest lists "
                     f"{len(recorded.get('problem_ids') or [])} problems x {group_size} responses")
    return tensors


class CachedTeacher(Teacher):
    """The teacher's stored log-probs of the replayed rows; no model is loaded."""

    def __init__(self, cache: TeacherCache):
        self.cache = cache

    def score(self, rollouts: Rollouts, need_hidden: bool = False) -> TeacherOutput:
        if need_hidden:
            raise ValueError("a teacher cache stores sampled-token log-probs only (no full distributions)")
        rows = self.cache.rows_of(rollouts.problems)
        length = rollouts.response_ids.shape[1]
        stored = self.cache.tensors["response_ids"][rows, :length]
        mask = rollouts.response_mask.long()
        if not torch.equal(stored * mask, rollouts.response_ids * mask):
            raise ValueError("CachedTeacher: these rollouts are not the cached responses")
        return TeacherOutput(token_logprobs=self.cache.tensors["teacher_logprobs"][rows, :length]
                             * rollouts.response_mask)
