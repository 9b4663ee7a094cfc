"""The bundled chain task: generation, reference solver, local grader."""

import json

import pytest

from kdrl.tasks import (
    SPLITS,
    ChainTaskConfig,
    export_jsonl,
    extract_boxed,
    generate_problems,
    is_correct,
    load_jsonl,
    solve,
)


@pytest.fixture(scope="module")
def problems():
    return {split: generate_problems(split, 400, seed=0) for split in SPLITS}


def test_record_shape(problems):
    for split, ps in problems.items():
        assert len(ps) == 400
        assert len({p["id"] for p in ps}) == 400
        for p in ps:
            assert set(p) == {"id", "prompt", "answer", "solution", "metadata"}
            assert p["metadata"]["split"] == split
            assert p["prompt"].endswith("=?\n")
            assert p["answer"] in set("0123456789")
            assert p["solution"].endswith(f"\\boxed{{{p['answer']}}}")
            assert p["solution"].count("=") == p["metadata"]["steps"]


def test_reference_solutions_are_correct(problems):
    for ps in problems.values():
        for p in ps:
            assert is_correct(p, p["solution"])
            assert solve(p["prompt"]) == (p["solution"], p["answer"])


def test_solver_example():
    assert solve("3+4*2-5=?\n") == ("3+4=7 7*2=4 4-5=9 \\boxed{9}", "9")
    assert solve("9*9-0=?\n") == ("9*9=1 1-0=1 \\boxed{1}", "1")
    with pytest.raises(ValueError):
        solve("hello")


def test_corrupted_solutions_fail(problems):
    for p in problems["train"][:100]:
        wrong = str((int(p["answer"]) + 1) % 10)
        body = p["solution"].rsplit("\\boxed", 1)[0]
        assert not is_correct(p, body + f"\\boxed{{{wrong}}}")
        assert not is_correct(p, body + p["answer"])  # no box
        assert not is_correct(p, body + f"\\boxed{{{p['answer']}")  # unclosed box
        assert not is_correct(p, "")
        # the last box counts
        assert not is_correct(p, p["solution"] + f" \\boxed{{{wrong}}}")
        assert is_correct(p, f"\\boxed{{{wrong}}} " + p["solution"])


def test_extract_boxed():
    assert extract_boxed("x \\boxed{3} y \\boxed{\\frac{1}{2}} z") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{7} then \\boxed{8") == "7"
    assert extract_boxed("no box") is None
    assert extract_boxed(None) is None
    assert extract_boxed("\\boxed{}") == ""


def test_deterministic_from_seed():
    for split in SPLITS:
        a = generate_problems(split, 50, seed=3)
        assert a == generate_problems(split, 50, seed=3)
        assert [p["prompt"] for p in a] != [p["prompt"] for p in generate_problems(split, 50, seed=4)]


def test_ood_is_longer_than_train(problems):
    max_train = max(p["metadata"]["steps"] for p in problems["train"])
    min_ood = min(p["metadata"]["steps"] for p in problems["test_ood"])
    assert min_ood > max_train
    cfg = ChainTaskConfig()
    assert {p["metadata"]["steps"] for p in problems["train"]} == set(range(cfg.min_steps, cfg.max_steps + 1))
    assert {p["metadata"]["steps"] for p in problems["test_id"]} == set(range(cfg.min_steps, cfg.max_steps + 1))


def test_test_id_disjoint_from_train():
    train = {p["prompt"] for p in generate_problems("train", 3000, seed=0)}
    train |= {p["prompt"] for p in generate_problems("train", 3000, seed=1)}
    test_id = generate_problems("test_id", 500, seed=0)
    assert not train & {p["prompt"] for p in test_id}
    assert len({p["prompt"] for p in test_id}) == 500  # distinct within the split


def test_difficulty_knob_and_validation():
    hard = ChainTaskConfig(difficulty=2)
    assert hard.step_range("train") == (4, 7)
    assert hard.step_range("test_ood") == (8, 10)
    ps = generate_problems("train", 50, seed=0, config=hard)
    assert min(p["metadata"]["steps"] for p in ps) >= 4
    easy = ChainTaskConfig(min_steps=1, max_steps=2, ood_min_steps=3, ood_max_steps=3, ops="+")
    for p in generate_problems("test_ood", 20, seed=0, config=easy):
        assert p["metadata"]["steps"] == 3 and "*" not in p["prompt"] and "-" not in p["prompt"]
    with pytest.raises(ValueError):
        ChainTaskConfig(max_steps=6, ood_min_steps=6)
    with pytest.raises(ValueError):
        ChainTaskConfig(ops="/")
    with pytest.raises(ValueError):
        generate_problems("valid", 1, seed=0)


def test_export_jsonl_roundtrip(tmp_path, problems):
    path = tmp_path / "sub" / "train.jsonl"
    export_jsonl(problems["train"][:10], path)
    lines = path.read_text().splitlines()
    assert len(lines) == 10 and json.loads(lines[0]) == problems["train"][0]
    assert load_jsonl(path) == problems["train"][:10]


# --------------------------------------------------------------------------- the bundled task: running sums

from collections import Counter  # noqa: E402
import random  # noqa: E402

from kdrl.rewards import math_reward  # noqa: E402
from kdrl.types import Problem  # noqa: E402
from kdrl.tasks import sums  # noqa: E402


@pytest.fixture(scope="module")
def sum_problems():
    return {split: sums.generate_problems(split, 500, seed=0) for split in sums.SPLITS}


def test_sums_record_shape_and_steps(sum_problems):
    cfg = sums.SumsTaskConfig()
    for split, ps in sum_problems.items():
        assert len({p["id"] for p in ps}) == len({p["prompt"] for p in ps}) == 500
        for p in ps:
            assert p["metadata"] == {"task": "sums", "steps": p["metadata"]["steps"], "split": split}
            assert p["prompt"].endswith("=?\n") and p["solution"].endswith(f"\\boxed{{{p['answer']}}}")
            assert p["solution"].count("=") == p["metadata"]["steps"]
            assert all(0 <= c <= sums.MAX_TOTAL for _, _, _, c in sums.reference_steps(p["prompt"]))
    steps = {split: {p["metadata"]["steps"] for p in ps} for split, ps in sum_problems.items()}
    assert steps["train"] == steps["test_id"] == set(range(cfg.min_steps, cfg.max_steps + 1))
    assert steps["test_ood"] == set(range(cfg.ood_min_steps, cfg.ood_max_steps + 1))
    long = sum(p["metadata"]["steps"] > cfg.max_steps for p in sum_problems["sft"]) / 500
    assert abs(long - cfg.sft_long_fraction) < 0.04


def test_sums_splits_are_disjoint():
    test = {p["prompt"] for s in ("test_id", "test_ood") for p in sums.generate_problems(s, 1000, seed=0)}
    for seed in (0, 1000):
        for split in ("train", "sft"):
            assert not test & {p["prompt"] for p in sums.generate_problems(split, 3000, seed=seed)}


def test_sums_solver_example_and_bad_prompt():
    assert sums.solve("47+8-3+9=?\n") == ("47+8=55 55-3=52 52+9=61 \\boxed{61}", "61")
    assert sums.solve("5-5+0=?\n") == ("5-5=0 0+0=0 \\boxed{0}", "0")
    with pytest.raises(ValueError, match="not a sums prompt"):
        sums.solve("3*4=?\n")


def test_sums_every_reference_solution_verifies_and_corruptions_fail(sum_problems):
    for ps in sum_problems.values():
        for p in ps[:200]:
            assert sums.is_correct(p, p["solution"])
            problem = Problem(id=p["id"], prompt=p["prompt"], answer=p["answer"], metadata=p["metadata"])
            assert sums.chain_correct(problem, p["solution"]) and sums.chain_correct(p, p["solution"])
            assert math_reward(problem, p["solution"]) == 1.0
            wrong = str(int(p["answer"]) + 1)
            body = p["solution"].rsplit("\\boxed", 1)[0]
            assert not sums.is_correct(p, body + f"\\boxed{{{wrong}}}")
            assert sums.is_correct(problem, p["solution"]) and not sums.is_correct(problem, body + f"\\boxed{{{wrong}}}")
            assert math_reward(problem, body + f"\\boxed{{{wrong}}}") == 0.0
            assert not sums.chain_correct(problem, body + f"\\boxed{{{wrong}}}")
            # one wrong intermediate total, the right final answer: outcome reward yes, chain no
            first = sums.reference_steps(p["prompt"])[0]
            bad = p["solution"].replace(f"={first[3]} ", f"={first[3] + 1} ", 1)
            assert math_reward(problem, bad) == 1.0 and not sums.chain_correct(problem, bad)
            assert not sums.is_correct(p, body + p["answer"])  # no box


def test_sums_chain_correct_on_hand_made_responses():
    prompt, answer = "47+8-3+9=?\n", "61"
    right = "47+8=55 55-3=52 52+9=61 \\boxed{61}"
    assert sums.steps_correct(prompt, answer, right)
    # the right answer through a wrong step (two errors that cancel): outcome yes, chain no
    assert sums.is_correct({"answer": answer}, "47+8=54 54-3=52 52+9=61 \\boxed{61}")
    assert not sums.steps_correct(prompt, answer, "47+8=54 54-3=52 52+9=61 \\boxed{61}")
    assert not sums.steps_correct(prompt, answer, "47+8=55 52+9=61 \\boxed{61}")  # a step skipped
    assert not sums.steps_correct(prompt, answer, "\\boxed{61}")  # no chain at all
    assert not sums.steps_correct(prompt, answer, "47+8=55 55+3=58 58+9=61 \\boxed{61}")  # wrong operator copied
    assert not sums.steps_correct(prompt, answer, right + " 61+1=62")  # a step after the box
    assert not sums.steps_correct(prompt, answer, "47+8=55 55-3=52 52+9=61 \\boxed{62}")
    assert sums.steps_correct(prompt, answer, "47+8=55  55-3=52, 52+9=61 so \\boxed{61}")  # spacing is free


def test_sums_guessing_does_not_pay(sum_problems):
    """The best constant answer and a uniformly random answer in 0..99 stay under 3% on every split."""
    for split, ps in sum_problems.items():
        counts = Counter(p["answer"] for p in ps)
        assert counts.most_common(1)[0][1] / len(ps) < 0.03, split
        rng = random.Random(0)
        assert sum(str(rng.randint(0, sums.MAX_TOTAL)) == p["answer"] for p in ps) / len(ps) < 0.03, split


def test_sums_config_validation():
    with pytest.raises(ValueError, match="ood_min_steps"):
        sums.SumsTaskConfig(max_steps=6)
    with pytest.raises(ValueError, match="sft_long_fraction"):
        sums.SumsTaskConfig(sft_long_fraction=1.5)
    with pytest.raises(ValueError, match="unknown split"):
        sums.generate_problems("valid", 1, seed=0)


def test_sums_process_metric_is_registered():
    from kdrl.tasks import process_metric

    p = sums.generate_problems("test_id", 1, seed=0)[0]
    problem = Problem(id=p["id"], prompt=p["prompt"], answer=p["answer"], metadata=p["metadata"])
    metric = process_metric(problem)
    assert metric is sums.chain_correct and metric(problem, p["solution"])
