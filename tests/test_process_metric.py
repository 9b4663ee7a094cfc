"""The process-level metric (a whole chain right) on hand-made responses, its report beside outcome
accuracy in evaluation, and the paired bootstrap that compares two methods problem by problem."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from kdrl.evaluate import evaluate_problems, paired_bootstrap
from kdrl.tasks import PROCESS_METRICS, chain_correct, generate_problems, process_metric
from kdrl.tasks.chains import TASK, chain_steps
from kdrl.types import Problem


def chain_problem(prompt: str, answer: str, modulus: int = 10, task: str | None = TASK) -> Problem:
    return Problem(id=prompt.strip(), prompt=prompt, answer=answer,
                   metadata={} if task is None else {"task": task, "modulus": modulus})


P = chain_problem("3+4*2-5=?\n", "9")  # 3+4=7 7*2=4 4-5=9


@pytest.mark.parametrize("response, expected", [
    ("3+4=7 7*2=4 4-5=9 \\boxed{9}", True),             # the reference solution
    ("3 + 4 = 7, 7 * 2 = 4; 4 - 5 = 9 so \\boxed{ 9 }", True),  # spacing and punctuation do not matter
    ("3+4=7 7*2=5 4-5=9 \\boxed{9}", False),            # a wrong intermediate result, right answer
    ("3+4=7 4-5=9 \\boxed{9}", False),                  # a step missing
    ("3+4=7 7*2=4 4-5=9 9+0=9 \\boxed{9}", False),      # an extra step
    ("7*2=4 3+4=7 4-5=9 \\boxed{9}", False),            # steps out of order
    ("3+4=7 7*2=4 4-5=9 \\boxed{8}", False),            # right chain, wrong answer
    ("3+4=7 7*2=4 4-5=9", False),                       # no boxed answer
    ("\\boxed{9}", False),                              # a guess: right answer, no chain
    ("3+4=7 7*2=4 4-5=9 \\boxed{9} 1+1=2", True),       # text after the last box is not part of the chain
])
def test_chain_correct_on_hand_made_responses(response, expected):
    assert chain_correct(P, response) is expected


def test_chain_correct_uses_the_problems_modulus():
    mod7 = chain_problem("5+4=?\n", "2", modulus=7)
    assert chain_correct(mod7, "5+4=2 \\boxed{2}")
    assert not chain_correct(mod7, "5+4=9 \\boxed{2}")
    assert chain_steps("1+2=3 3*3=9") == [(1, "+", 2, 3), (3, "*", 3, 9)]


def test_generated_problems_are_tagged_and_reference_solutions_are_chain_correct():
    for split in ("train", "test_id", "test_ood"):
        for row in generate_problems(split, 200, seed=3):
            problem = Problem(row["id"], row["prompt"], row["answer"], row["solution"], row["metadata"])
            assert problem.metadata["task"] == TASK and problem.metadata["modulus"] == 10
            assert process_metric(problem) is chain_correct
            assert chain_correct(problem, problem.solution)
            wrong = problem.solution.replace(f"\\boxed{{{problem.answer}}}", f"\\boxed{{{(int(problem.answer) + 1) % 10}}}")
            assert not chain_correct(problem, wrong)


def test_process_metric_registry_picks_by_task():
    assert PROCESS_METRICS[TASK] is chain_correct
    assert process_metric(chain_problem("1+1=?\n", "2", task=None)) is None
    assert process_metric(chain_problem("1+1=?\n", "2", task="no-such-task")) is None


# --------------------------------------------------------------------------- evaluation

class ScriptedEngine:
    """Returns fixed responses per problem id (k samples each)."""

    def __init__(self, responses: dict[str, list[str]]):
        self.responses = responses

    def generate(self, problems, n, sampling):
        texts = [self.responses[p.id][j] for p in problems for j in range(n)]
        return SimpleNamespace(response_texts=texts, response_mask=torch.ones(len(texts), 3),
                               truncated=torch.zeros(len(texts), dtype=torch.bool))


def boxed_reward(problem, text):
    got = text.rsplit("\\boxed{", 1)[-1].split("}")[0].strip() if "\\boxed{" in text else None
    return float(got == problem.answer)


def test_evaluation_reports_chain_correct_and_per_problem_records():
    q = chain_problem("2*3=?\n", "6")
    engine = ScriptedEngine({
        P.id: ["3+4=7 7*2=4 4-5=9 \\boxed{9}", "\\boxed{9}"],  # right + chain; right by guess
        q.id: ["2*3=6 \\boxed{6}", "2*3=5 \\boxed{5}"],         # right + chain; wrong
    })
    details: list[dict] = []
    metrics = evaluate_problems(engine, [P, q], boxed_reward, samples=2, temperature=1.0, details=details)
    assert metrics["accuracy"] == pytest.approx(0.75)  # (2/2 + 1/2) / 2
    assert metrics["chain_correct"] == pytest.approx(0.5)  # (1/2 + 1/2) / 2
    assert details == [{"id": P.id, "correct": [1, 1], "chain_correct": [1, 0]},
                       {"id": q.id, "correct": [1, 0], "chain_correct": [1, 0]}]
    with_texts: list[dict] = []
    evaluate_problems(engine, [P, q], boxed_reward, samples=2, temperature=1.0, details=with_texts,
                      detail_responses=True)
    assert [d.pop("responses") for d in with_texts] == [engine.responses[P.id], engine.responses[q.id]]
    assert with_texts == details
    untagged = chain_problem("2*3=?\n", "6", task=None)
    assert "chain_correct" not in evaluate_problems(engine, [untagged], boxed_reward, samples=2, temperature=1.0)


# --------------------------------------------------------------------------- paired bootstrap

def test_bootstrap_of_a_constant_difference_is_that_difference():
    mean, low, high = paired_bootstrap([[0.25] * 7] * 3, replicates=500, seed=1)
    assert mean == low == high == pytest.approx(0.25, abs=1e-12)


def test_bootstrap_two_problems_one_seed_is_exact():
    """One seed, differences (0, 1): a replicate's mean is 0, 0.5 or 1 with probability 1/4, 1/2,
    1/4, so the 2.5% and 97.5% quantiles are exactly 0 and 1."""
    mean, low, high = paired_bootstrap([[0.0, 1.0]], replicates=4000, seed=0)
    assert (mean, low, high) == (0.5, 0.0, 1.0)


def test_bootstrap_known_difference_over_problems_and_seeds():
    """A right on every problem, B on every other one: d = 1 or 0, mean 0.5. With one seed the
    interval's half-width is 1.96 · sd(d)/√P = 1.96 · 0.5/20 = 0.049 (P = 400); a seed that adds
    its own offset widens it (the seeds are resampled too)."""
    d = [[float(p % 2 == 0) for p in range(400)]]
    mean, low, high = paired_bootstrap(d, replicates=20_000, seed=0)
    assert mean == 0.5
    assert (high - low) / 2 == pytest.approx(1.96 * 0.5 / 20, rel=0.08)
    assert paired_bootstrap(d, replicates=20_000, seed=0) == (mean, low, high)  # the seed fixes it
    other = paired_bootstrap(d, replicates=20_000, seed=1)  # another resampling: the same up to noise
    assert other[1] == pytest.approx(low, abs=0.006) and other[2] == pytest.approx(high, abs=0.006)
    offsets = [-0.2, 0.0, 0.2]
    seeds = [[x + offset for x in d[0]] for offset in offsets]
    mean3, low3, high3 = paired_bootstrap(seeds, replicates=20_000, seed=0)
    assert mean3 == pytest.approx(0.5) and low3 < 0.5 < high3
    assert high3 - low3 > 2 * (high - low) / 3 ** 0.5  # wider than problem noise alone over 3 seeds
    with pytest.raises(ValueError):
        paired_bootstrap([], seed=0)


def test_paired_rows_match_problems_by_id(tmp_path):
    from kdrl.bench import markdown, paired_rows, run_dir
    from kdrl.evaluate import EVAL_PROBLEMS_FILE

    # seed s: A right on all 4 problems, B right on problems 0 and 1 (seed 1 lists them reversed)
    for seed in (0, 1):
        ids = ["p0", "p1", "p2", "p3"] if seed == 0 else ["p3", "p2", "p1", "p0"]
        for method, right in (("a", {"p0", "p1", "p2", "p3"}), ("b", {"p0", "p1"})):
            directory = run_dir(tmp_path, method, seed)
            directory.mkdir(parents=True)
            records = [{"id": i, "correct": [int(i in right), int(i in right)], "chain_correct": [int(i in right), 0]}
                       for i in ids]
            (directory / EVAL_PROBLEMS_FILE).write_text(json.dumps({"test": records}))
    rows = paired_rows(tmp_path, [("a", "b")], [0, 1])
    by_metric = {r["metric"]: r for r in rows}
    assert by_metric["accuracy"]["difference"] == pytest.approx(0.5)  # 2 of 4 problems, every sample
    assert by_metric["chain_correct"]["difference"] == pytest.approx(0.25)  # half the samples of those
    assert by_metric["accuracy"]["seeds"] == 2 and by_metric["accuracy"]["problems"] == 4
    table = markdown({"rows": [], "seeds": [0, 1], "command": "test", "total_seconds": 0, "jobs": 1,
                      "target_accuracy": 0.5, "pairs": rows})
    assert "| a − b | test | accuracy | +50.0 |" in table and "| a − b | test | chain_correct | +25.0 |" in table
