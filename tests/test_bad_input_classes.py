"""Issue 14's classes of bad input, each with the one line it must print: data files, recipes,
overrides, devices, model directories, the file system and the CLI. As in test_bad_input.py:
a non-zero exit, one line on stderr naming the file, line or key, no traceback, and nothing
written (the run directory is not created)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_bad_input import RECIPE, base_args, fails, write
from test_cli import assert_one_line_error, run_kdrl


@pytest.fixture
def run_dir(tmp_path) -> Path:
    path = tmp_path / "run"
    yield path
    assert not path.exists(), "a failed start must not create the run directory"


# ----------------------------------------------------------------------------- data files

@pytest.mark.parametrize("rows, needle", [
    ([{"id": "a", "prompt": "1+1=?", "answer": "2"}, {"id": "b", "prompt": "2+2=?", "answer": "4"},
      {"id": "a", "prompt": "3+3=?", "answer": "6"}], "rows.jsonl:3: duplicate id 'a' (also at {dir}/rows.jsonl:1)"),
    ([{"prompt": "1+1=?", "answer": "2", "metadata": [1, 2]}], "rows.jsonl:1: field 'metadata' must be an object"),
    ([{"prompt": "1+1=?", "answer": "2", "metadata": "easy"}], "rows.jsonl:1: field 'metadata' must be an object"),
    ([{"prompt": "1+1=?", "answer": "  "}], "rows.jsonl:1: field 'answer' is empty"),
])
def test_bad_rows(tiny_assets, run_dir, tmp_path, capsys, rows, needle):
    path = write(tmp_path / "rows.jsonl", rows)
    line = fails(capsys, *base_args(tiny_assets, run_dir), f"data.train={path}")
    assert needle.format(dir=tmp_path) in line


def test_huge_line_is_refused_before_parsing(tiny_assets, run_dir, tmp_path, capsys):
    path = write(tmp_path / "huge.jsonl", [{"prompt": "1+1=?", "answer": "2"},
                                          {"prompt": "1+" * 1_000_000 + "1=?", "answer": "1000001"}])
    line = fails(capsys, *base_args(tiny_assets, run_dir), f"data.train={path}")
    assert "huge.jsonl:2: line is longer than 1,048,576 bytes" in line


def test_long_prompt_is_refused_without_tokenizing_it(tiny_assets, run_dir, tmp_path, capsys, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    calls = []
    original = PreTrainedTokenizerBase.__call__
    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__",
                        lambda self, text, *a, **k: calls.append(len(text)) or original(self, text, *a, **k))
    path = write(tmp_path / "long.jsonl", [{"id": "long", "prompt": "1+" * 200_000 + "1=?", "answer": "2"}])
    line = fails(capsys, *base_args(tiny_assets, run_dir), f"data.train={path}")
    assert "long.jsonl: problem 'long': prompt has 400,003 characters, more than the 244 allowed" in line
    assert max(calls, default=0) < 400_000, "the long prompt was tokenized"


@pytest.mark.parametrize("kind, needle", [
    ("fifo", "a FIFO (named pipe), not a regular file"),
    ("loop", "a symlink loop"),
    ("dangling", "a symlink to nowhere.jsonl, which does not exist"),
])
def test_data_path_that_is_not_a_regular_file(tmp_path, kind, needle):
    """Run in a subprocess with a time limit: a FIFO used to block the reader forever."""
    path = tmp_path / "data.jsonl"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "loop":
        os.symlink(tmp_path / "other.jsonl", path)
        os.symlink(path, tmp_path / "other.jsonl")
    else:
        os.symlink("nowhere.jsonl", path)
    result = run_kdrl("train", f"data.train={path}", f"log.run_dir={tmp_path / 'run'}")
    assert_one_line_error(result, f"{path}: {needle}")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- recipes

@pytest.mark.parametrize("content, needle", [
    (b"train:\n  steps: 3\n  steps: 4\n", "r.yaml line 3: duplicate key 'steps' (first given on line 2)"),
    (b"name: r\ntrain:\n  steps: 3\nrollout:\n  group_size: 4\ntrain:\n  seed: 1\n", "r.yaml line 6: duplicate key 'train'"),
    (b"name: caf\xe9\n", "r.yaml line 1: not UTF-8 text (byte 0xe9)"),
])
def test_bad_recipe_files(tmp_path, content, needle):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(content)
    assert_one_line_error(run_kdrl("train", str(recipe), f"log.run_dir={tmp_path / 'run'}"), needle)
    assert not (tmp_path / "run").exists()


def test_recipe_that_is_a_fifo_or_a_loop(tmp_path):
    os.mkfifo(tmp_path / "fifo.yaml")
    os.symlink(tmp_path / "b.yaml", tmp_path / "a.yaml")
    os.symlink(tmp_path / "a.yaml", tmp_path / "b.yaml")
    assert_one_line_error(run_kdrl("train", str(tmp_path / "fifo.yaml")), "fifo.yaml': a FIFO (named pipe)")
    assert_one_line_error(run_kdrl("train", str(tmp_path / "a.yaml")), "a.yaml': a symlink loop")


# ----------------------------------------------------------------------------- overrides

@pytest.mark.parametrize("override, needle", [
    ("data.system_prompt=a: b: c", "data.system_prompt: the value 'a: b: c' is not valid YAML"),
    ("data.prompt_template=Q: {question}", "data.prompt_template: expected text, but YAML reads 'Q: {question}' as a mapping"),
    ('data.prompt_template="Q: {question}"', "data.prompt_template: names {question}, but only {prompt} can be filled in"),
    ('data.prompt_template="Q: {prompt"', "data.prompt_template: not a valid template"),
    ('self_teacher.context="{soln} {prompt}"', "self_teacher.context: names {soln}"),
    ('failed_groups.hint_template="Hint: {solution}"', "failed_groups.hint_template: names {solution}"),
    ("train.adam_beta1=2", "train.adam_beta1: must lie in [0, 1)"),
    ("train.adam_beta2=1", "train.adam_beta2: must lie in [0, 1)"),
    ("train.weight_decay=-0.1", "train.weight_decay: must not be negative"),
    ("rollout.temperature=inf", "rollout.temperature: 'inf' is not a finite number"),
    ("train.learning_rate=inf", "train.learning_rate: 'inf' is not a finite number"),
    ("train.learning_rate=.nan", "train.learning_rate: nan is not a finite number"),
    ("objective.beta.initial=nan", "objective.beta.initial: 'nan' is not a finite number"),
    ("train.warmup_steps=-5", "train.warmup_steps: must not be negative (got -5)"),
    ("eval.every=-1", "eval.every: must not be negative (got -1)"),
    ("checkpoint.every=-2", "checkpoint.every: must not be negative (got -2)"),
    ("log.sample_every=-3", "log.sample_every: must not be negative (got -3)"),
    ("rollout.generation_batch_size=0", "rollout.generation_batch_size: must be at least 1"),
])
def test_bad_override_values(override, needle):
    from kdrl.config import ConfigError, load_config

    with pytest.raises(ConfigError) as error:
        load_config(RECIPE, [override])
    assert needle in str(error.value)
    assert "\n" not in str(error.value)


def test_bad_override_value_through_the_cli(tiny_assets, run_dir, capsys):
    line = fails(capsys, *base_args(tiny_assets, run_dir), "data.system_prompt=a: b: c")
    assert "data.system_prompt:" in line and "quote it" in line


# ----------------------------------------------------------------------------- devices

@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_one(tiny_assets, run_dir, capsys):
    line = fails(capsys, *base_args(tiny_assets, run_dir), "train.device=cuda")
    assert "train.device: 'cuda', but torch sees no CUDA device here" in line


@pytest.mark.parametrize("name, needle", [("gpu", "'gpu' is not a device"), ("meta", "'meta' is not a device kdrl")])
def test_unknown_device(tiny_assets, run_dir, capsys, name, needle):
    assert f"train.device: {needle}" in fails(capsys, *base_args(tiny_assets, run_dir), f"train.device={name}")


# ----------------------------------------------------------------------------- model directories

def broken_model(tiny_assets: Path, tmp_path: Path, damage: str) -> Path:
    model = shutil.copytree(tiny_assets / "student", tmp_path / damage)
    config = json.loads((model / "config.json").read_text())
    if damage == "bert":
        config.update(model_type="bert", architectures=["BertForMaskedLM"])
    elif damage == "unknown_type":
        config["model_type"] = "nosucharch"
    elif damage == "wider":
        config["hidden_size"] *= 2
    elif damage == "renamed":  # another architecture's parameter names for the same shapes
        from safetensors.torch import load_file, save_file

        weights = load_file(model / "model.safetensors")
        save_file({name.replace("model.", "transformer.", 1): value for name, value in weights.items()},
                  model / "model.safetensors", metadata={"format": "pt"})
    (model / "config.json").write_text(json.dumps(config))
    if damage == "not_json":
        (model / "config.json").write_text("{'model_type': 'qwen2',}")
    elif damage == "no_weights":
        (model / "model.safetensors").unlink()
    elif damage == "adapter_only":
        (model / "model.safetensors").unlink()
        (model / "adapter_config.json").write_text("{}")
    elif damage == "no_tokenizer":
        (model / "tokenizer.json").unlink()
        (model / "tokenizer_config.json").unlink()
    return model


@pytest.mark.parametrize("damage, needle", [
    ("bert", "a 'bert' model is an encoder (or encoder-decoder) architecture"),
    ("unknown_type", "config.json has model_type 'nosucharch', which transformers"),
    ("not_json", "config.json is not valid JSON (line 1"),
    ("no_weights", "no weights file (model.safetensors)"),
    ("adapter_only", "holds a LoRA adapter (adapter_config.json), not a model"),
    ("wider", "the weights' shapes do not match config.json"),
    ("renamed", "the weights file has no values for"),
    ("no_tokenizer", "no tokenizer in no_tokenizer"),
])
def test_broken_student_directory(tiny_assets, run_dir, tmp_path, capsys, damage, needle):
    model = broken_model(tiny_assets, tmp_path, damage)
    line = fails(capsys, *base_args(tiny_assets, run_dir), f"model.student={model}")
    assert f"model '{model}': {needle}" in line
    assert "teacher" not in line, "the student's fault is blamed on the teacher"


def test_lora_adapter_with_only_a_pickled_bin(tiny_assets, tmp_path):
    import torch

    from kdrl.config import load_config
    from kdrl.models import ModelError, load_model

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    torch.save({}, adapter / "adapter_model.bin")
    config = load_config(None, ["model.lora.enabled=true"]).model
    with pytest.raises(ModelError, match="holds only a pickled adapter_model.bin; kdrl reads weights from "
                                         "safetensors only"):
        load_model(str(tiny_assets / "student"), config, torch.device("cpu"), trainable=True, adapter=adapter)


# ----------------------------------------------------------------------------- the file system and the CLI

def test_run_dir_that_is_an_existing_file(tiny_assets, tmp_path, capsys):
    target = tmp_path / "run"
    target.write_text("my notes")
    line = fails(capsys, *base_args(tiny_assets, target))
    assert str(target) in line
    assert target.read_text() == "my notes"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_run_directory(tiny_assets, tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        line = fails(capsys, *base_args(tiny_assets, parent / "run"))
        assert str(parent / "run") in line and "ermission denied" in line
    finally:
        parent.chmod(0o700)


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tiny_assets, tmp_path):
    """A file-size limit (ulimit -f) below the size of a checkpoint: the save fails, says the disk is
    full, leaves no half-written directory, and the previous checkpoint stays complete."""
    import resource

    from kdrl import checkpoint as ckpt

    run = tmp_path / "run"
    args = [*base_args(tiny_assets, run), "checkpoint.every=1", "log.sample_every=0"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, "-m", "kdrl", "train", RECIPE, *args], capture_output=True, text=True,
                           timeout=300, env=env)
    assert first.returncode == 0, first.stderr
    weights = (ckpt.latest_checkpoint(run) / "model.safetensors").stat().st_size

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (weights // 2, weights // 2))

    second = subprocess.run([sys.executable, "-m", "kdrl", "train", "--resume", str(run), "train.steps=2"],
                            capture_output=True, text=True, timeout=300, env=env, preexec_fn=limit_file_size)
    line = assert_one_line_error(second, "step-00000002: the disk is full", "step-00000001 is complete")
    assert "kdrl: error:" in line
    names = sorted(path.name for path in ckpt.checkpoint_dir(run).iterdir())
    assert names == ["step-00000001"], names
    assert ckpt.is_complete(ckpt.checkpoint_dir(run) / "step-00000001")


def test_cache_teacher_out_is_an_existing_file(tiny_assets, tmp_path):
    out = tmp_path / "cache"
    out.write_text("not a cache")
    result = run_kdrl("cache-teacher", "lightning_opd", "--out", str(out), f"model.student={tiny_assets / 'student'}",
                      f"model.teacher={tiny_assets / 'teacher'}", f"data.train={tiny_assets / 'data' / 'train.jsonl'}")
    assert_one_line_error(result, f"--out {out}: exists and is not a directory")
    assert out.read_text() == "not a cache"


def test_cache_teacher_accepts_overrides_after_out(tiny_assets, tmp_path):
    from kdrl.cli import build_parser, main

    out = tmp_path / "cache"
    code = main(["cache-teacher", "lightning_opd", f"model.student={tiny_assets / 'student'}", "--out", str(out),
                 f"model.teacher={tiny_assets / 'teacher'}", f"data.train={tiny_assets / 'data' / 'train.jsonl'}",
                 "teacher_cache.num_prompts=2", "rollout.group_size=2", "rollout.max_new_tokens=4"])
    assert code == 0 and out.is_dir() and any(out.iterdir())
    args, extra = build_parser().parse_known_args(["cache-teacher", "r", "--out", "d", "a=1"])
    assert extra == ["a=1"]


@pytest.mark.parametrize("spec, needle", [
    ("builtins:exec", "'builtins' is a Python standard-library module"),
    ("os:popen", "'os' is a Python standard-library module"),
])
def test_dangerous_reward_callables_are_refused(tiny_assets, run_dir, capsys, spec, needle):
    line = fails(capsys, *base_args(tiny_assets, run_dir), f"reward.functions=[{spec}]")
    assert line.startswith("kdrl: error: reward.functions:") and needle in line


def test_empty_directory_as_data(tiny_assets, run_dir, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    line = fails(capsys, *base_args(tiny_assets, run_dir), f"data.train={tmp_path / 'folder'}")
    assert "folder: a directory, but not one saved by datasets.save_to_disk" in line


def test_plot_of_a_directory_that_is_not_a_run(tmp_path):
    assert_one_line_error(run_kdrl("plot", str(tmp_path / "nowhere")), "nowhere: not a run directory")


def test_full_disk_while_writing_the_config_leaves_nothing(tiny_assets, tmp_path):
    import resource

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "kdrl", "train", RECIPE, *base_args(tiny_assets, run)],
                            capture_output=True, text=True, timeout=300, env=env,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024)))
    assert_one_line_error(result, "the disk is full (or a file-size limit, ulimit -f, was reached)")
    assert not run.exists()
