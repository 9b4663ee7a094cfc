"""Problems from local files: JSONL, Parquet, a directory saved by `datasets`, or the bundled task.

Every row becomes a ``Problem``. A malformed row is a ``DataError`` naming the file and line.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from kdrl.paths import describe_nonregular
from kdrl.types import Problem


class DataError(ValueError):
    """A user's data file is wrong; the message names the file and line."""


BUNDLED_PREFIX = "bundled:"
# One problem (a JSONL line, or a row's prompt) longer than this is refused as it is read, before
# anything parses or tokenizes it: a 50 MB line took 13 GB and no answer in 15 minutes to tokenize.
# A 32k-token solution is ~130 kB.
MAX_PROBLEM_BYTES = 1 << 20


def bundled_data_dir() -> Path:
    return Path(__file__).parent / "assets" / "demo" / "data"


def resolve_data_path(spec: str) -> Path:
    """``bundled:SPLIT`` -> the shipped JSONL of that split; anything else is a local path."""
    if spec.startswith(BUNDLED_PREFIX):
        split = spec[len(BUNDLED_PREFIX):]
        path = bundled_data_dir() / f"{split}.jsonl"
        if not path.is_file():
            names = sorted(p.stem for p in bundled_data_dir().glob("*.jsonl"))
            raise DataError(f"{spec}: no bundled split '{split}' (bundled splits: {', '.join(names) or 'none'})")
        return path
    path = Path(spec).expanduser()
    problem = describe_nonregular(path)
    if problem:
        raise DataError(f"{spec}: {problem}")
    return path


def _row_to_problem(row: Any, where: str, index: int, fields: dict[str, str]) -> Problem:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with '{fields['prompt']}' and '{fields['answer']}', "
                        f"got {type(row).__name__}")
    missing = [fields[k] for k in ("prompt", "answer") if row.get(fields[k]) is None]
    if missing:
        raise DataError(f"{where}: missing field {', '.join(repr(m) for m in missing)}")
    prompt, answer = row[fields["prompt"]], row[fields["answer"]]
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(f"{where}: field '{fields['prompt']}' must be a non-empty string")
    if len(prompt) > MAX_PROBLEM_BYTES:
        raise DataError(f"{where}: field '{fields['prompt']}' has {len(prompt):,} characters, more than the "
                        f"{MAX_PROBLEM_BYTES:,} a problem may have")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: field '{fields['answer']}' must be a string or a number")
    if isinstance(answer, float) and not math.isfinite(answer):
        raise DataError(f"{where}: field '{fields['answer']}' is {answer}, not a finite number")
    if isinstance(answer, str) and not answer.strip():
        raise DataError(f"{where}: field '{fields['answer']}' is empty (every problem needs the answer its "
                        "rewards check against)")
    solution = row.get(fields["solution"])
    if solution is not None and not isinstance(solution, str):
        raise DataError(f"{where}: field '{fields['solution']}' must be a string")
    known = {fields["prompt"], fields["answer"], fields["solution"], "id", "metadata"}
    if row.get("metadata") is not None and not isinstance(row["metadata"], dict):
        raise DataError(f"{where}: field 'metadata' must be an object of named values, got "
                        f"{type(row['metadata']).__name__}")
    metadata = dict(row.get("metadata") or {})
    metadata.update({k: v for k, v in row.items() if k not in known and v is not None})
    row_id = row.get("id")
    return Problem(id=str(row_id if row_id is not None else index), prompt=prompt, answer=str(answer), solution=solution,
                   metadata=metadata)


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    with path.open("rb") as handle:
        line_number = 0
        while True:
            raw = handle.readline(MAX_PROBLEM_BYTES + 1)  # never more than the limit in memory
            if not raw:
                return
            line_number += 1
            if len(raw) > MAX_PROBLEM_BYTES:
                raise DataError(f"{path}:{line_number}: line is longer than {MAX_PROBLEM_BYTES:,} bytes, the most "
                                "one problem may have")
            try:
                yield line_number, raw.decode("utf-8-sig" if line_number == 1 else "utf-8")  # a BOM is not data
            except UnicodeDecodeError:
                raise DataError(f"{path}:{line_number}: not UTF-8 text") from None


def read_jsonl(path: Path) -> Iterable[tuple[str, int, Any]]:
    """(``file:line``, row index, parsed row) for each non-blank line; bad JSON or bytes name the line."""
    row_index = 0  # ids default to the 0-based row number, as for Parquet
    for line_number, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{line_number}: not valid JSON ({error.msg})") from None
        yield f"{path}:{line_number}", row_index, row
        row_index += 1


def _read_json(path: Path) -> Iterable[tuple[str, int, Any]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of problems")
    for index, row in enumerate(rows):
        yield f"{path}: item {index}", index, row


def _read_parquet(path: Path) -> Iterable[tuple[str, int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({error})") from None
    for index, row in enumerate(table.to_pylist()):
        yield f"{path}: row {index}", index, row


DATASET_DIR_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")  # what save_to_disk writes


def _read_hf_dataset_dir(path: Path, split: Optional[str]) -> Iterable[tuple[str, int, Any]]:
    if not any((path / name).is_file() for name in DATASET_DIR_MARKERS):
        raise DataError(f"{path}: a directory, but not one saved by datasets.save_to_disk (no "
                        f"{' or '.join(DATASET_DIR_MARKERS)}); give a .jsonl, .json or .parquet file")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a saved datasets directory needs `pip install datasets`") from None
    try:
        dataset = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as error:
        raise DataError(f"{path}: not a directory saved by datasets.save_to_disk ({error})") from None
    if isinstance(dataset, datasets.DatasetDict):
        split = split or ("train" if "train" in dataset else next(iter(dataset)))
        dataset = dataset[split]
    for index, row in enumerate(dataset):
        yield f"{path}: row {index}", index, row


def load_problems(spec: str, prompt_field: str = "prompt", answer_field: str = "answer",
                  solution_field: str = "solution", limit: Optional[int] = None,
                  require_solution: bool | str = False) -> list[Problem]:
    """Load problems from ``spec`` (a path or ``bundled:SPLIT``); ``require_solution``: every row needs
    a solution (a string says which setting needs it, for the error)."""
    path = resolve_data_path(spec)
    fields = {"prompt": prompt_field, "answer": answer_field, "solution": solution_field}
    suffix = path.suffix.lower()
    if path.is_dir():
        rows = _read_hf_dataset_dir(path, None)
    elif suffix in (".jsonl", ".ndjson"):
        rows = read_jsonl(path)
    elif suffix == ".json":
        rows = _read_json(path)
    elif suffix in (".parquet", ".pq"):
        rows = _read_parquet(path)
    else:
        raise DataError(f"{spec}: unsupported data format '{suffix}' (use .jsonl, .json, .parquet, "
                        "or a directory saved by datasets)")
    problems: list[Problem] = []
    first_seen: dict[str, str] = {}  # id -> where: a method that looks rows up by id (ampo) needs them unique
    for where, index, row in rows:
        problem = _row_to_problem(row, where, index, fields)
        if problem.id in first_seen:
            raise DataError(f"{where}: duplicate id '{problem.id}' (also at {first_seen[problem.id]}); "
                            "give every problem its own id")
        first_seen[problem.id] = where
        if require_solution and not problem.solution:
            needed_by = "" if require_solution is True else f", for {require_solution}"
            raise DataError(f"{where}: field '{solution_field}' is required by this recipe (problem "
                            f"'{problem.id}' has none{needed_by})")
        problems.append(problem)
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise DataError(f"{spec}: no problems found (the file is empty)")
    return problems


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token of ``tokenizer`` can cover (its longest vocabulary entry)."""
    cached = getattr(tokenizer, "_kdrl_longest_token_chars", None)
    if cached is None:
        cached = max((len(token) for token in tokenizer.get_vocab()), default=1)
        try:
            tokenizer._kdrl_longest_token_chars = cached
        except AttributeError:
            pass
    return max(cached, 1)


def prompt_ids(tokenizer: Any, text: str, max_tokens: int, add_special_tokens: bool) -> tuple[Optional[list[int]], str]:
    """(ids, size) of ``text``: ids is None when it has more than ``max_tokens`` tokens, and size
    says how many ("303 tokens"). A text longer than ``max_tokens`` times the longest token
    must have more tokens than that, so it is refused without being tokenized (size is then
    its length in characters)."""
    if len(text) > max_tokens * longest_token_chars(tokenizer):
        return None, f"{len(text):,} characters"
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    return (ids if len(ids) <= max_tokens else None), f"{len(ids)} tokens"


def response_token_ids(tokenizer: Any, text: str) -> list[int]:
    """The token ids a response ``text`` is trained or scored as: its tokens (nothing added) + EOS."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def format_prompt(problem: Problem, tokenizer: Any, chat_template: bool, prompt_template: str = "{prompt}",
                  system_prompt: Optional[str] = None, extra: str = "") -> str:
    """The exact text the model is conditioned on for ``problem``.

    ``extra`` is appended to the user turn (a hint, a privileged solution).
    """
    text = prompt_template.format(prompt=problem.prompt) + extra
    if not chat_template:
        return text
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data.chat_template=true but the tokenizer has no chat template "
                        "(set data.chat_template=false or use a chat model's tokenizer)")
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def make_encoder(tokenizer: Any, config: Any, max_tokens: int) -> Callable[..., list[int]]:
    """``encode(problem, suffix="") -> prompt token ids`` with the run's templates (``config``: a
    kdrl.config.Config), memoised; a prompt over ``max_tokens`` is a DataError naming the problem."""
    cache: dict[tuple[str, str], list[int]] = {}

    def encode(problem: Problem, suffix: str = "") -> list[int]:
        key = (problem.prompt, suffix)
        if key not in cache:
            text = format_prompt(problem, tokenizer, config.data.chat_template, config.data.prompt_template,
                                 config.data.system_prompt, extra=suffix)
            ids, size = prompt_ids(tokenizer, text, max_tokens, add_special_tokens=not config.data.chat_template)
            if ids is None:
                raise DataError(f"problem '{problem.id}': prompt has {size}, more than the "
                                f"{max_tokens} allowed (data.max_prompt_tokens, and the model's context "
                                f"minus rollout.max_new_tokens)")
            cache[key] = ids
        return cache[key]

    return encode


class PromptSampler:
    """Deterministic epoch-wise shuffled order of problem indices, resumable from a position."""

    def __init__(self, num_problems: int, seed: int, shuffle: bool = True):
        self.num_problems = num_problems
        self.seed = seed
        self.shuffle = shuffle
        self.position = 0  # number of indices handed out so far

    def _order(self, epoch: int) -> list[int]:
        import torch

        if not self.shuffle:
            return list(range(self.num_problems))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_problems, generator=generator).tolist()

    def next(self, count: int) -> list[int]:
        indices = []
        while len(indices) < count:
            epoch, offset = divmod(self.position, self.num_problems)
            order = self._order(epoch)
            take = min(count - len(indices), self.num_problems - offset)
            indices.extend(order[offset:offset + take])
            self.position += take
        return indices

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "num_problems": self.num_problems}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
