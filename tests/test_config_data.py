"""Config loading and data loading: typed values, dotted overrides, errors that name the key or line."""
from __future__ import annotations

import json

import pytest

from kdrl.config import Config, ConfigError, load_config, save_config
from kdrl.data import DataError, PromptSampler, load_problems


def test_defaults_are_the_kdrl_recipe():
    """`kdrl train` with no arguments runs recipes/kdrl.yaml: same objective, same budget."""
    config = load_config()
    assert config.objective.advantage == "grpo"
    assert config.objective.kd_placement == "loss" and config.objective.kd_estimator == "rkl"
    recipe = load_config("recipes/kdrl.yaml")
    assert recipe.objective == config.objective and recipe.train == config.train
    assert recipe.rollout == config.rollout


def test_overrides_are_typed():
    config = load_config(None, ["train.steps=7", "objective.beta.initial=1e-2", "data.eval=[a.jsonl,b.jsonl]",
                                "log.tensorboard=true", "model.reference=null"])
    assert config.train.steps == 7 and isinstance(config.train.steps, int)
    assert config.objective.beta.initial == 0.01
    assert config.data.eval == ["a.jsonl", "b.jsonl"]
    assert config.log.tensorboard is True and config.model.reference is None


@pytest.mark.parametrize("override, needle", [
    ("train.stepz=3", "train.stepz"),
    ("objective.advantage=grop", "did you mean 'grpo'"),
    ("train.steps=abc", "train.steps"),
    ("rollout.group_size=1", "rollout.group_size"),
    ("rollout.top_p=0", "rollout.top_p"),
    ("objective.beta.initial=-0.1", "objective.beta.initial"),
    ("objective.kd_estimator=k1", "zero-mean"),
    ("objective.kd_placement=advantage", "objective.kd_estimator"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_group_of_one_allowed_without_group_advantage():
    load_config(None, ["rollout.group_size=1", "objective.advantage=none", "objective.pg_coef=0"])


def test_saved_config_round_trips(tmp_path):
    config = load_config(None, ["train.steps=11", "objective.kd_mask=incorrect"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_recipe_yaml_error_names_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 3\n bad: [\n")
    with pytest.raises(ConfigError, match="r.yaml line"):
        load_config(recipe)


def test_jsonl_and_parquet_load_the_same(tmp_path):
    rows = [{"prompt": "1+2=?\n", "answer": 3, "id": "a", "domain": "math"},
            {"prompt": "2*3=?\n", "answer": "6", "solution": "2*3=6 \\boxed{6}"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ["prompt", "answer", "id", "domain", "solution"]  # a table has every column in every row
    table = [{key: (str(r[key]) if key == "answer" else r.get(key)) for key in columns} for r in rows]
    pq.write_table(pa.Table.from_pylist(table), tmp_path / "p.parquet")
    for path in ("p.jsonl", "p.parquet"):
        problems = load_problems(str(tmp_path / path))
        assert [p.answer for p in problems] == ["3", "6"]
        assert problems[0].id == "a" and problems[0].metadata["domain"] == "math"
        assert problems[1].id == "1"
        assert problems[1].solution.endswith("\\boxed{6}")


@pytest.mark.parametrize("content, needle", [
    ("", ": no problems found"),
    ('{"prompt": "x"}\n', ":1: missing field 'answer'"),
    ('{"prompt": "x", "answer": "1"}\n[1, 2]\n', ":2: expected an object"),
    ('{"prompt": "", "answer": "1"}\n', ":1: field 'prompt' must be a non-empty string"),
    ('{"prompt": "x", "answer": "1"}\n{oops\n', ":2: not valid JSON"),
])
def test_bad_data_names_file_and_line(tmp_path, content, needle):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match="d.jsonl" + needle.replace("(", r"\(")):
        load_problems(str(path))


def test_missing_solution_when_required(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "x", "answer": "1"}\n')
    with pytest.raises(DataError, match="d.jsonl:1: field 'solution' is required"):
        load_problems(str(path), require_solution=True)


def test_prompt_order_is_deterministic_and_resumable():
    first = PromptSampler(10, seed=3)
    order = first.next(25)
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    resumed = PromptSampler(10, seed=3)
    resumed.next(7)
    state = resumed.state_dict()
    again = PromptSampler(10, seed=3)
    again.load_state_dict(state)
    assert again.next(18) == order[7:25]
