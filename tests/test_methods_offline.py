"""METHODS.md §6 methods acting around the objective: lightning_opd (teacher cache), ampo (teacher
solutions on all-failed groups, shaped off-policy term), ghpo (growing hints), several teachers."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kdrl.config import ConfigError, TeacherRoute, load_config
from kdrl.models import load_tokenizer
from kdrl.objective.policy_gradient import shaped_offpolicy_pg
from kdrl.rollout import SamplingParams
from kdrl.rollout.failed_groups import (HintResampler, TeacherSolutionReplacer, all_failed_groups, hint_text,
                                        load_solution_files)
from kdrl.rollout.rows import Row, pack
from kdrl.rollout.sources import CachedRollouts
from kdrl.teachers.cache import CachedTeacher, TeacherCacheError, build_teacher_cache, load_teacher_cache
from kdrl.teachers.routed import RoutedTeacher, pick_route
from kdrl.types import Problem, TeacherOutput
from test_objective import make_batch, make_objective

RECIPES = Path(__file__).parent.parent / "recipes"


def boxed_reward(problem, text: str) -> float:
    return float(text.endswith("\\boxed{" + problem.answer + "}"))


def problem(i: int, answer: str = "3", solution: str | None = "1+2=3 \\boxed{3}", **metadata) -> Problem:
    return Problem(id=f"p{i}", prompt=f"{i}+0=?\n", answer=answer, solution=solution, metadata=metadata)


def rollouts_of(problems, texts, group_size, tokenizer, suffixes=None):
    suffixes = suffixes or [""] * len(problems)
    rows = []
    for b, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prompt = tokenizer(problems[b // group_size].prompt + suffixes[b // group_size],
                           add_special_tokens=False)["input_ids"]
        rows.append(Row(torch.tensor(prompt), torch.tensor(ids), torch.full((len(ids),), -0.5), text, False, "policy"))
    return pack(rows, problems, group_size, tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("bundled:student")


# --------------------------------------------------------------------------- lightning_opd

def cache_overrides(tiny_overrides, tmp_path, **extra):
    values = tiny_overrides + ["teacher_cache.num_prompts=3", "rollout.group_size=2", "rollout.max_new_tokens=8",
                               f"teacher_cache.path={tmp_path / 'cache'}"]
    return values + [f"{k}={v}" for k, v in extra.items()]


def test_cache_round_trip_equals_live_teacher(tiny_overrides, tiny_assets, tmp_path):
    from kdrl.data import load_problems
    from kdrl.models import load_model, pick_device
    from kdrl.teachers import LocalTeacher

    config = load_config(RECIPES / "lightning_opd.yaml", cache_overrides(tiny_overrides, tmp_path))
    folder = build_teacher_cache(config)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(manifest["problem_ids"]) == 3 and len(manifest["student"]) == 64
    assert manifest["sampling"]["group_size"] == 2
    problems = load_problems(config.data.train)
    tokenizer = load_tokenizer(config.model.student)
    cache = load_teacher_cache(config, problems, tokenizer)
    assert [p.id for p in cache.problems] == manifest["problem_ids"]
    device = pick_device("cpu")
    student = load_model(config.model.student, config.model, device, trainable=False)
    teacher = load_model(config.model.teacher, config.model, device, trainable=False)
    engine = CachedRollouts(cache, LocalTeacher(student))
    rollouts = engine.generate(cache.problems[1:], 2, SamplingParams())
    assert rollouts.num_rows == 4 and rollouts.sources == ["cache"] * 4
    cached = CachedTeacher(cache).score(rollouts).token_logprobs
    live = LocalTeacher(teacher).score(rollouts).token_logprobs
    torch.testing.assert_close(cached, live, atol=1e-5, rtol=0)
    assert cached.abs().sum() > 0
    # recomputed log pi_old of the (unchanged) initial student equals the sampler's stored log-probs
    stored = cache.tensors["sampler_logprobs"][cache.rows_of(cache.problems[1:]), :rollouts.response_ids.shape[1]]
    torch.testing.assert_close(rollouts.sampler_logprobs, stored, atol=1e-4, rtol=0)
    assert torch.equal(CachedRollouts(cache).generate(cache.problems[1:], 2, SamplingParams()).sampler_logprobs,
                       stored)


def test_training_from_cache_loads_no_teacher(tiny_overrides, tmp_path):
    from kdrl.build import build
    from kdrl.config_needs import needs_teacher_model
    from kdrl.trainer import training_step

    overrides = cache_overrides(tiny_overrides, tmp_path)
    build_teacher_cache(load_config(RECIPES / "lightning_opd.yaml", overrides))
    run = build(load_config(RECIPES / "lightning_opd.yaml", overrides))
    assert not needs_teacher_model(run.config) and isinstance(run.teacher_scorer, CachedTeacher)
    assert isinstance(run.sampling_source, CachedRollouts)
    assert len(run.train_problems) == 3
    metrics = training_step(run)
    assert math.isfinite(metrics["loss"]) and metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("change, field", [("rollout.temperature=0.5", "sampling.temperature"),
                                           ("teacher_cache.num_prompts=4", "sampling.num_prompts"),
                                           ("train.seed=1", "sampling.seed"), ("teacher", "teacher"),
                                           ("data", "data")])
def test_mismatched_cache_is_refused_naming_the_field(change, field, tiny_overrides, tiny_assets, tmp_path):
    overrides = cache_overrides(tiny_overrides, tmp_path)
    build_teacher_cache(load_config(RECIPES / "lightning_opd.yaml", overrides))
    if change == "teacher":
        change = f"model.teacher={tiny_assets / 'student'}"
    elif change == "data":
        copy = tmp_path / "train.jsonl"
        copy.write_text((tiny_assets / "data" / "train.jsonl").read_text().replace("=?", "= ?", 1))
        change = f"data.train={copy}"
    config = load_config(RECIPES / "lightning_opd.yaml", overrides + [change])
    with pytest.raises(TeacherCacheError) as error:
        load_teacher_cache(config, [], None)
    message = str(error.value)
    assert f"the cache does not match this run: {field} is" in message
    assert f"kdrl cache-teacher recipes/lightning_opd.yaml --out {tmp_path / 'cache'}" in message
    assert "\n" not in message


def test_missing_cache_tells_the_build_command(tmp_path):
    config = load_config(RECIPES / "lightning_opd.yaml", [f"teacher_cache.path={tmp_path / 'none'}"])
    with pytest.raises(TeacherCacheError, match=r"no teacher cache there; build it first with: kdrl cache-teacher "
                                                r"recipes/lightning_opd.yaml --out .*none$"):
        load_teacher_cache(config, [], None)


def test_cli_missing_cache_is_one_line(tmp_path, capsys):
    from kdrl.cli import main

    assert main(["train", "lightning_opd", f"teacher_cache.path={tmp_path / 'none'}",
                 f"log.run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdrl: error:") and "kdrl cache-teacher" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- ampo

def test_shaped_offpolicy_term_hand_computed():
    s = torch.tensor([math.log(0.5), math.log(0.1)], requires_grad=True)
    a = torch.tensor([2.0, -1.0])
    value = shaped_offpolicy_pg(s, a, 0.1)
    # -A·p/(p+γ): -2·0.5/0.6, +1·0.1/0.2
    torch.testing.assert_close(value, torch.tensor([-2 * 0.5 / 0.6, 0.5]))
    value.sum().backward()
    # d/ds = -A·γ·p/(p+γ)²
    torch.testing.assert_close(s.grad, torch.tensor([-2 * 0.1 * 0.5 / 0.36, 0.1 * 0.1 / 0.04]))


def test_objective_shapes_only_offpolicy_rows():
    """offpolicy_pg=shaped replaces the clipped ratio term by -A·p/(p+γ) on rows with on_policy=0 only."""
    from kdrl.types import StudentOutput

    batch, hidden, weight = make_batch(on_policy=[1.0, 0.0, 1.0, 1.0], rewards=(1.0, 0.0, 0.0, 1.0))
    plain, shaped = (make_objective(kd_placement="none", offpolicy_pg=mode) for mode in ("none", "shaped"))
    out = StudentOutput(hidden_states=hidden, output_weight=weight)
    prepared = plain.prepare(batch, 0)
    s = torch.log_softmax(hidden @ weight.T, -1).gather(-1, batch.response_ids[..., None])[..., 0].detach()
    ratio = torch.exp(s - batch.sampler_logprobs)
    a, w = prepared.advantages, prepared.token_weights
    clipped = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
    expected_plain = (clipped * w).sum()
    shaped_rows = -a * torch.exp(s) / (torch.exp(s) + 0.1)
    expected_shaped = (torch.where(torch.tensor([1, 0, 1, 1])[:, None] == 0, shaped_rows, clipped) * w).sum()
    torch.testing.assert_close(plain.loss(prepared, out)[1]["pg_loss"], expected_plain)
    torch.testing.assert_close(shaped.loss(shaped.prepare(batch, 0), out)[1]["pg_loss"], expected_shaped)
    assert not torch.isclose(expected_plain, expected_shaped)


class ZeroScorer:
    def score(self, rollouts, need_hidden=False):
        return TeacherOutput(token_logprobs=torch.full(rollouts.response_ids.shape, -0.25) * rollouts.response_mask)


def test_ampo_replaces_k_rows_of_all_failed_groups_only(tokenizer, tmp_path):
    problems = [problem(0), problem(1), problem(2, solution="1+1=2 \\boxed{2}")]  # p2's solution is wrong
    texts = ["x \\boxed{3}", "no", "no", "no",  "no", "no", "no", "no",  "no", "no", "no", "no"]
    rollouts = rollouts_of(problems, texts, 4, tokenizer)
    rewards = torch.tensor([boxed_reward(problems[b // 4], t) for b, t in enumerate(texts)])
    assert all_failed_groups(rewards, 4, 1.0) == [1, 2]
    file_a, file_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    file_a.write_text(json.dumps({"id": "p1", "solution": "teacher A \\boxed{3}"}) + "\n")
    file_b.write_text(json.dumps({"id": "p1", "solution": "teacher B \\boxed{3}"}) + "\n"
                      + json.dumps({"id": "p1", "solution": "wrong \\boxed{4}"}) + "\n")
    pools = load_solution_files([str(file_a), str(file_b)])
    assert pools == {"p1": ["teacher A \\boxed{3}", "teacher B \\boxed{3}", "wrong \\boxed{4}"]}
    replacer = TeacherSolutionReplacer(2, pools, False, boxed_reward, tokenizer, ZeroScorer(), 1.0, 64)
    out, new_rewards, metrics = replacer(rollouts, rewards)
    # group 1: its last 2 rows are the two verified teacher solutions; group 2 has none verified: untouched
    assert out.response_texts == texts[:6] + ["teacher A \\boxed{3}", "teacher B \\boxed{3}"] + texts[8:]
    assert new_rewards.tolist() == [1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    assert out.sources == ["policy"] * 6 + ["teacher_solution"] * 2 + ["policy"] * 4
    assert metrics == {"failed_group_fraction": 2 / 3, "teacher_row_fraction": 2 / 12}
    expected_ids = tokenizer("teacher B \\boxed{3}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert out.response_ids[7, :len(expected_ids)].tolist() == expected_ids
    assert out.response_mask[7].sum() == len(expected_ids)
    assert torch.all(out.sampler_logprobs[6:8][out.response_mask[6:8] > 0] == -0.25)  # current student's
    for b in list(range(6)) + list(range(8, 12)):  # untouched rows keep their tokens and log-probs
        n = int(rollouts.response_mask[b].sum())
        assert torch.equal(out.response_ids[b, :n], rollouts.response_ids[b, :n])
        assert torch.equal(out.sampler_logprobs[b, :n], rollouts.sampler_logprobs[b, :n])
    # the dataset's own solution, with k=2 and one solution: used in turn for both rows
    out, new_rewards, _ = TeacherSolutionReplacer(2, {}, True, boxed_reward, tokenizer, ZeroScorer(), 1.0, 64)(
        rollouts, rewards)
    assert out.response_texts[6:8] == ["1+2=3 \\boxed{3}"] * 2 and new_rewards[8:].sum() == 0
    # a solution longer than the generation budget is skipped
    out, _, metrics = TeacherSolutionReplacer(2, {}, True, boxed_reward, tokenizer, ZeroScorer(), 1.0, 5)(
        rollouts, rewards)
    assert metrics["teacher_row_fraction"] == 0 and out is rollouts


# --------------------------------------------------------------------------- ghpo

def test_hint_text_levels():
    solution = "abcdefgh"  # 8 characters
    assert [hint_text(solution, f) for f in (0.25, 0.5, 0.75)] == ["ab", "abcd", "abcdef"]
    assert hint_text("abcdefghij", 0.25, "\nHint: {hint}") == "\nHint: ab"  # floor(2.5)


class HintEngine:
    """Answers correctly only when the hint is at least ``needed`` characters (per problem id)."""

    def __init__(self, tokenizer, needed):
        self.tokenizer, self.needed, self.calls = tokenizer, needed, []

    def generate(self, problems, n, sampling, step=0, prompt_suffixes=None):
        self.calls.append([(p.id, s) for p, s in zip(problems, prompt_suffixes)])
        texts = [f"\\boxed{{{p.answer}}}" if len(s) >= self.needed[p.id] and j == 0 else "no"
                 for p, s in zip(problems, prompt_suffixes) for j in range(n)]
        return rollouts_of(problems, texts, n, self.tokenizer, prompt_suffixes)


def test_ghpo_grows_the_hint_and_stops_at_the_first_success(tokenizer):
    solution = "12345678 \\boxed{3}"  # 18 characters: hints of 4, 9, 13
    problems = [problem(0, solution=solution), problem(1, solution=solution), problem(2, solution=solution),
                problem(3, solution=None)]
    texts = ["\\boxed{3}", "no"] + ["no"] * 6
    rollouts = rollouts_of(problems, texts, 2, tokenizer)
    rewards = torch.tensor([1.0] + [0.0] * 7)
    engine = HintEngine(tokenizer, {"p1": 9, "p2": 100})  # p1 succeeds at 50%, p2 never
    out, new_rewards, metrics = HintResampler(engine, boxed_reward, [0.5, 0.25, 0.75], "{hint}", 1.0, 0)(
        rollouts, rewards, SamplingParams())
    # group 0 succeeded: never resampled; group 3 has no solution to hint from
    assert engine.calls == [[("p1", "1234"), ("p2", "1234")], [("p1", "12345678 "), ("p2", "12345678 ")],
                            [("p2", "12345678 \\box")]]
    assert new_rewards.tolist() == [1, 0, 1, 0, 0, 0, 0, 0]
    assert out.response_texts == ["\\boxed{3}", "no", "\\boxed{3}", "no", "no", "no", "no", "no"]
    hinted_prompt = tokenizer(problems[1].prompt + "12345678 ", add_special_tokens=False)["input_ids"]
    assert out.prompt_ids[2][out.prompt_mask[2].bool()].tolist() == hinted_prompt
    plain_prompt = tokenizer(problems[2].prompt, add_special_tokens=False)["input_ids"]
    assert out.prompt_ids[4][out.prompt_mask[4].bool()].tolist() == plain_prompt  # p2 kept unhinted
    assert metrics == {"failed_group_fraction": 3 / 4, "hint_rescued_fraction": 1 / 4, "hint_level": 0.5}


# --------------------------------------------------------------------------- several teachers

ROUTES = [TeacherRoute(match=["2", "3"], teacher="A", beta=0.5), TeacherRoute(match=["4"], teacher="B", beta=2.0)]


def test_routing_picks_the_first_matching_route_and_refuses_unmatched():
    assert pick_route(problem(0, steps=3), "steps", ROUTES) == 0
    assert pick_route(problem(0, steps=4), "steps", ROUTES) == 1
    with pytest.raises(ConfigError, match=r"problem 'p7' \(steps=5\) matches no route"):
        pick_route(problem(7, steps=5), "steps", ROUTES)
    assert pick_route(problem(7, steps=5), "steps", ROUTES + [TeacherRoute(match=["*"], teacher="A")]) == 2
    assert pick_route(problem(7, domain="math"), "domain", [TeacherRoute(match=["code"]),
                                                            TeacherRoute(match=["math"])]) == 1


class ConstantScorer:
    def __init__(self, value):
        self.value, self.rows = value, 0

    def score(self, rollouts, need_hidden=False):
        self.rows += rollouts.num_rows
        return TeacherOutput(token_logprobs=torch.full(rollouts.response_ids.shape, self.value)
                             * rollouts.response_mask)


def test_routed_teacher_scores_each_row_with_its_teacher_and_beta(tokenizer):
    problems = [problem(0, steps=4), problem(1, steps=2)]
    rollouts = rollouts_of(problems, ["a", "bb", "c", "dd"], 2, tokenizer)
    scorers = {"A": ConstantScorer(-1.0), "B": ConstantScorer(-2.0)}
    teacher = RoutedTeacher(scorers, ["A", "B"], [0.5, 2.0], "steps", ROUTES)
    out = teacher.score(rollouts)
    assert teacher.kd_coef_of(rollouts.row_problems()).tolist() == [2.0, 2.0, 0.5, 0.5]
    assert out.token_logprobs[:, 0].tolist() == [-2.0, -2.0, -1.0, -1.0]
    assert scorers["A"].rows == 2 and scorers["B"].rows == 2
    assert torch.equal(out.token_logprobs != 0, rollouts.response_mask > 0)


def test_unmatched_problem_is_an_error_at_load_time(tiny_overrides, tmp_path):
    from kdrl.build import build

    config = load_config(RECIPES / "multi_teacher.yaml", tiny_overrides)
    config.teachers.routes = config.teachers.routes[:1]  # steps 2-3 only: 4- and 5-step problems match nothing
    with pytest.raises(ConfigError, match=r"teachers.routes: problem '.*' \(steps=[45]\) matches no route"):
        build(config)
    assert not (tmp_path / "run").exists()


def test_kd_coef_multiplies_the_kd_term():
    """The routes' β is an objective weight: prepare computes it from each row's problem."""
    import dataclasses

    from kdrl.objective import Objective
    from kdrl.types import StudentOutput

    batch, hidden, weight = make_batch()  # 2 groups of 2
    batch = dataclasses.replace(batch, problems=[problem(0), problem(1)])
    betas = {"p0": 0.5, "p1": 2.0}

    def routed(**kw):
        plain = make_objective(**kw)
        return plain, Objective(plain.cfg, 10, 6, kd_coef_of=lambda problems: torch.tensor(
            [betas[p.id] for p in problems], dtype=torch.float64))

    opd, opd_routed = routed(advantage="none", kd_placement="advantage", kd_estimator="k1")
    base, scaled = opd.prepare(batch, 0), opd_routed.prepare(batch, 0)
    coef = torch.tensor([0.5, 0.5, 2.0, 2.0], dtype=torch.float64)
    assert base.kd_coef is None and torch.equal(scaled.kd_coef, coef)
    # Â = -β·c_i·(s_old - τ): the per-row coefficient scales each row's KD advantage
    torch.testing.assert_close(scaled.advantages, base.advantages * coef[:, None])
    kdrl, kdrl_routed = routed(kd_placement="loss", kd_estimator="k2", pg_coef=0.0, advantage="none")
    out = StudentOutput(hidden_states=hidden, output_weight=weight)
    betas.update(p0=3.0, p1=3.0)
    torch.testing.assert_close(kdrl_routed.loss(kdrl_routed.prepare(batch, 0), out)[0],
                               3.0 * kdrl.loss(kdrl.prepare(batch, 0), out)[0])


# --------------------------------------------------------------------------- the recipes on the bundled task

BUNDLED_STEPS = ["train.steps=3", "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=48",
                 "eval.before=false", "data.eval=[]", "log.progress=false", "log.plot=false",
                 "checkpoint.save_final=false"]


@pytest.mark.parametrize("recipe", ["lightning_opd", "ampo", "ghpo", "multi_teacher"])
def test_three_steps_on_the_bundled_task(recipe, tmp_path):
    from kdrl.trainer import train

    overrides = BUNDLED_STEPS + [f"log.run_dir={tmp_path / 'run'}"]
    if recipe == "lightning_opd":
        overrides += ["teacher_cache.num_prompts=4", f"teacher_cache.path={tmp_path / 'cache'}"]
        build_teacher_cache(load_config(RECIPES / f"{recipe}.yaml", overrides))
    train(load_config(RECIPES / f"{recipe}.yaml", overrides))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["skipped"] == 0 for r in steps)
    if recipe in ("ampo", "ghpo"):
        assert all("failed_group_fraction" in r for r in steps)
    if recipe in ("lightning_opd", "multi_teacher"):
        assert all(r["kl_sampled"] != 0 for r in steps)
