"""Bad input: one line on stderr naming the file, line or key; a non-zero exit; no traceback;
and nothing written (the run directory is not created).

Cases already covered elsewhere are not repeated here: unknown recipe keys, bad values of
top_p / beta / kd_estimator and malformed or incomplete JSONL rows (test_cli.py), and the data
loader's own messages (test_config_data.py).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kdrl import checkpoint as ckpt
from kdrl.cli import main
from kdrl.config import load_config, save_config

RECIPE = str(Path(__file__).parent.parent / "recipes" / "kdrl.yaml")


def base_args(assets: Path, run_dir: Path) -> list[str]:
    return [f"model.student={assets / 'student'}", f"model.teacher={assets / 'teacher'}",
            f"data.train={assets / 'data' / 'train.jsonl'}", f"data.eval=[{assets / 'data' / 'test.jsonl'}]",
            "train.steps=1", "rollout.max_new_tokens=12", "log.progress=false", "log.plot=false",
            f"log.run_dir={run_dir}"]


def fails(capsys, *argv: str) -> str:
    """Run the CLI in-process; return its single stderr line after checking the exit and the lack of traceback."""
    code = main(["train", *argv])
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("kdrl: error: "), lines[0]
    return lines[0]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    path = tmp_path / "run"
    yield path
    assert not path.exists(), "a failed start must not create the run directory"


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


# ----------------------------------------------------------------------------- data files

def test_empty_train_file(tiny_assets, run_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    line = fails(capsys, *base_args(tiny_assets, run_dir), f"data.train={empty}")
    assert "empty.jsonl" in line and "no problems found" in line


def test_missing_eval_file(tiny_assets, run_dir, tmp_path, capsys):
    line = fails(capsys, *base_args(tiny_assets, run_dir), f"data.eval=[{tmp_path / 'held_out.jsonl'}]")
    assert "held_out.jsonl: no such file or directory" in line


def test_data_file_not_utf8(tiny_assets, run_dir, tmp_path, capsys):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"prompt": "1+1=?", "answer": "2"}).encode() + b'\n{"prompt": "caf\xe9"}\n')
    assert "latin1.jsonl:2: not UTF-8 text" in fails(capsys, *base_args(tiny_assets, run_dir), f"data.train={path}")


@pytest.mark.parametrize("name, content, needle", [
    ("rows.csv", b"prompt,answer\n1+1,2\n", "rows.csv: unsupported data format '.csv'"),
    ("rows.parquet", b"not parquet at all", "rows.parquet: not a readable Parquet file"),
    ("rows.json", b'{"prompt": "1+1", "answer": "2"}', "rows.json: expected a JSON list"),
])
def test_unreadable_data_formats(tiny_assets, run_dir, tmp_path, capsys, name, content, needle):
    (tmp_path / name).write_bytes(content)
    assert needle in fails(capsys, *base_args(tiny_assets, run_dir), f"data.train={tmp_path / name}")


def test_prompt_longer_than_model_context(tiny_assets, run_dir, tmp_path, capsys):
    # the tiny models have 256 positions; 12 are kept for the response, so 244 are left for a prompt
    path = write(tmp_path / "long.jsonl", [{"prompt": "1+1=?", "answer": "2"},
                                           {"id": "too-long", "prompt": "1+" * 150 + "1=?", "answer": "151"}])
    line = fails(capsys, *base_args(tiny_assets, run_dir), f"data.train={path}")
    assert "long.jsonl: problem 'too-long': prompt has 303 tokens, more than the 244 allowed" in line


def test_prompt_longer_than_max_prompt_tokens(tiny_assets, run_dir, tmp_path, capsys):
    path = write(tmp_path / "eval.jsonl", [{"prompt": "1+" * 20 + "1=?", "answer": "21"}])  # 43 tokens
    line = fails(capsys, *base_args(tiny_assets, run_dir), f"data.eval=[{path}]", "data.max_prompt_tokens=30")
    assert "eval.jsonl: problem '0': prompt has 43 tokens, more than the 30 allowed" in line
    assert "data.max_prompt_tokens" in line


def test_response_budget_leaves_no_room_for_prompt(tiny_assets, run_dir, capsys):
    line = fails(capsys, *base_args(tiny_assets, run_dir), "rollout.max_new_tokens=256")
    assert "rollout.max_new_tokens=256 leaves no room" in line


def test_two_eval_sets_with_one_name(tiny_assets, run_dir, tmp_path, capsys):
    (tmp_path / "other").mkdir()
    copy = shutil.copy(tiny_assets / "data" / "test.jsonl", tmp_path / "other" / "test.jsonl")
    line = fails(capsys, *base_args(tiny_assets, run_dir), f"data.eval=[{tiny_assets / 'data' / 'test.jsonl'},{copy}]")
    assert line.startswith("kdrl: error: data.eval:") and "'test'" in line


# ----------------------------------------------------------------------------- models and recipes

def test_teacher_with_a_different_tokenizer(tiny_assets, run_dir, tmp_path, capsys):
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    from kdrl.demo import EOS_TOKEN, PAD_TOKEN, make_model

    symbols = bytes_to_unicode()
    vocab = {PAD_TOKEN: 0, EOS_TOKEN: 1}
    for byte in reversed(range(256)):  # same size, other ids: every token means something else
        vocab[symbols[byte]] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                               clean_up_tokenization_spaces=False, model_max_length=256)
    teacher = tmp_path / "other_teacher"
    make_model(tokenizer, hidden_size=32, layers=1, heads=4, intermediate=64, seed=3).save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    line = fails(capsys, *base_args(tiny_assets, run_dir), f"model.teacher={teacher}")
    assert "the student and the teacher do not share a tokenizer" in line and "probe text" in line


def test_model_directory_without_config(tiny_assets, run_dir, tmp_path, capsys):
    (tmp_path / "not_a_model").mkdir()
    line = fails(capsys, *base_args(tiny_assets, run_dir), f"model.teacher={tmp_path / 'not_a_model'}")
    assert "model '" in line and "not_a_model" in line and "no config.json" in line


def test_pickled_weights_are_never_executed(tiny_assets, run_dir, tmp_path, capsys):
    import torch

    model = tmp_path / "pickled"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_assets / "student" / name, model / name)
    marker = tmp_path / "code_ran"
    torch.save({"model.embed_tokens.weight": RunsCode(str(marker))}, model / "pytorch_model.bin")
    line = fails(capsys, *base_args(tiny_assets, run_dir), f"model.student={model}")
    assert "pickled" in line and "pytorch_model.bin" in line and "not plain tensors" in line
    assert not marker.exists(), "unpickling ran code"


class RunsCode:
    """A pickle that creates a file when loaded without weights_only."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_truncated_safetensors(tiny_assets, run_dir, tmp_path, capsys):
    model = shutil.copytree(tiny_assets / "student", tmp_path / "truncated")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "unreadable safetensors weights" in fails(capsys, *base_args(tiny_assets, run_dir),
                                                     f"model.student={model}")


def test_unknown_reward_function(tiny_assets, run_dir, capsys):
    line = fails(capsys, *base_args(tiny_assets, run_dir), "reward.functions=[math,nosuch]")
    assert line.startswith("kdrl: error: reward.functions:") and "nosuch" in line


def test_group_of_one_with_group_advantage(tiny_assets, run_dir, capsys):
    line = fails(capsys, RECIPE, *base_args(tiny_assets, run_dir), "rollout.group_size=1")
    assert "rollout.group_size: must be at least 2 for the group advantage 'grpo'" in line


# ----------------------------------------------------------------------------- resume

@pytest.fixture
def saved_run(tiny_assets, tmp_path) -> Path:
    """A run directory whose config was saved but which has no complete checkpoint."""
    run = tmp_path / "saved"
    run.mkdir()
    save_config(load_config(RECIPE, base_args(tiny_assets, run)), run / "config.yaml")
    return run


def test_resume_without_a_run_directory(tmp_path, capsys):
    line = fails(capsys, "--resume", str(tmp_path / "nowhere"))
    assert "nowhere: not a run directory (no config.yaml)" in line
    assert not (tmp_path / "nowhere").exists()


def test_resume_without_a_complete_checkpoint(saved_run, capsys):
    root = ckpt.checkpoint_dir(saved_run)
    (root / f"{ckpt.TEMP_PREFIX}00000004-99999").mkdir(parents=True)  # a save that was killed
    (root / ckpt.step_name(2)).mkdir()  # no COMPLETE marker, no trainer state
    before = sorted(p.name for p in saved_run.rglob("*"))
    line = fails(capsys, "--resume", str(saved_run))
    assert f"{saved_run}: no complete checkpoint to resume from" in line
    assert sorted(p.name for p in saved_run.rglob("*")) == before


@pytest.mark.parametrize("damage", ["truncated", "not_a_zip"])
def test_resume_with_a_corrupt_trainer_state(saved_run, tiny_assets, capsys, recwarn, damage):
    import torch

    step = shutil.copytree(tiny_assets / "student", ckpt.checkpoint_dir(saved_run) / ckpt.step_name(2))
    state = step / ckpt.STATE_FILE
    torch.save({"step": 2, "optimizer": {"state": {}, "param_groups": []}}, state)
    state.write_bytes(state.read_bytes()[:200] if damage == "truncated" else b"\x80\x04garbage")
    (step / ckpt.COMPLETE_MARKER).write_text("2")
    line = fails(capsys, "--resume", str(saved_run))
    assert f"{state}: cannot be read" in line
    assert not recwarn.list, [str(w.message) for w in recwarn.list]  # nothing else printed
    assert not (saved_run / "metrics.jsonl").exists()


def test_resume_with_a_recipe(saved_run, capsys):
    line = fails(capsys, RECIPE, "--resume", str(saved_run))
    assert "--resume" in line and "kdrl.yaml" in line
