"""Rewards that do not depend on machine load, stay bounded on huge responses, and refuse or
name broken user functions (issue 14, item 6 and the reward-function classes)."""
from __future__ import annotations

import os
import signal
import textwrap
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest

from kdrl.rewards import RewardError, get_reward, load_reward, math_reward, reset_reward_stats, reward_stats
from kdrl.rewards import mathcheck, timelimit
from kdrl.rewards.simple import grade_simple


@dataclass
class P:
    answer: str
    id: str = "p0"
    prompt: str = "What is it?"
    solution: Optional[str] = None
    metadata: dict[str, Any] = field(default_factory=dict)


def no_math_verify(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a simple answer must not reach math-verify (or its time limit)")

    monkeypatch.setattr(timelimit, "_verify_guarded", boom)


@pytest.mark.parametrize("gold, response, expected", [
    ("0.001", r"\boxed{1e-3}", 1.0),  # scientific notation: math-verify reads e as Euler's number
    ("0", r"\boxed{-0}", 1.0),
    ("1/2", r"\boxed{0.5}", 1.0),
    ("0.5", r"\boxed{\frac{1}{2}}", 1.0),
    ("0.75", r"\boxed{\dfrac34}", 1.0),
    ("-0.75", r"\boxed{-\frac{3}{4}}", 1.0),
    ("1000000", r"\boxed{1e6}", 1.0),
    ("12", r"\boxed{012}", 1.0),
    ("12", r"\boxed{13}", 0.0),
    ("1/3", r"\boxed{2/3}", 0.0),
    ("2.5", r"\boxed{3.5}", 0.0),
    ("7", r"The answer is $\boxed{ 7 }$.", 1.0),
])
def test_simple_answers_are_graded_without_math_verify(monkeypatch, gold, response, expected):
    no_math_verify(monkeypatch)
    reset_reward_stats()
    assert math_reward(P(gold), response, timeout_s=1e-9) == expected  # no limit applies to them
    assert reward_stats()["fast_path"] == 1 and reward_stats()["timeouts"] == 0


@pytest.mark.parametrize("gold, pred", [
    ("1/2", "0.5"), ("3", "3.0"), ("5", "6"), ("0.333333", "1/3"), ("0.3333333", "0.333333"), ("2/4", "1/2"),
    ("-1", "1"), ("10", "10.000001"), ("10", "10.00001"), ("7", "+7"), ("0", "-0"), ("1.5", "3/2"),
    (r"\frac{1}{3}", "0.34"), ("100", "1e2"),
])
def test_fast_path_agrees_with_math_verify_where_it_decides(gold, pred):
    """The fast path changes no grade that math-verify gives today, except scientific notation,
    which math-verify misreads (``1e2`` is 1*e+2 there)."""
    fast = grade_simple(gold, pred)
    if fast is None:
        return  # left to math-verify
    mathcheck._import_math_verify()
    if "e" in pred:
        assert fast is True
        return
    assert fast == mathcheck._verify_core(gold, pred), (gold, pred)


def test_time_limit_is_cpu_time_in_the_main_thread(monkeypatch):
    """A verification that is descheduled (the machine is loaded) but uses little CPU is not a
    timeout: 0.6 s of waiting against a 0.2 s limit still grades it."""
    def slow_but_idle(gold, pred):
        time.sleep(0.6)
        return True

    monkeypatch.setattr(mathcheck, "_verify_core", slow_but_idle)
    reset_reward_stats()
    assert get_reward("math", timeout_s=0.2)(P(r"\sqrt{12}"), r"\boxed{2\sqrt{3}}") == 1.0
    assert reward_stats()["timeouts"] == 0


def test_time_limit_is_cpu_time_of_the_worker():
    """A worker stopped (as a loaded machine deschedules it) for longer than limit + grace is
    waited for: it has used no CPU, so its answer counts."""
    reward = get_reward("math", timeout_s=0.3)
    assert reward(P("1024"), r"\boxed{2^{10}}") == 1.0  # a warm idle worker ("^" runs on a worker)
    pid = timelimit._IDLE_WORKERS[-1].proc.pid
    os.kill(pid, signal.SIGSTOP)
    threading.Timer(0.3 + timelimit._HARD_KILL_GRACE_S + 0.7, os.kill, (pid, signal.SIGCONT)).start()
    reset_reward_stats()
    assert reward(P("2048"), r"\boxed{2^{11}}") == 1.0
    assert reward_stats()["timeouts"] == 0


def test_five_megabyte_response_is_bounded_before_extraction():
    from kdrl.rewards import exact_match_reward, format_reward

    for response, expected in [("\\boxed{" + "{" * 5_000_000, 0.0), ("x" * 5_000_000 + r"\boxed{5}", 1.0)]:
        for reward in (math_reward, exact_match_reward, format_reward):
            start = time.process_time()
            value = reward(P("5"), response)
            assert time.process_time() - start < 0.3, reward.__name__  # was 1.4-3 s of CPU unbounded
            assert value == (expected if reward is not format_reward else 0.0 if expected == 0 else 1.0)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = "kdrl_reliab_user_rewards"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        from os import system as score_by_shell

        def returns_none(problem, response):
            return None

        def returns_list(problem, response):
            return [1.0]

        def good(problem, response):
            return 1.0
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name


@pytest.mark.parametrize("function, needle", [
    ("returns_none", "returned NoneType None for problem 'p0'; it must return a finite number"),
    ("returns_list", "returned a list, which is not a number, for problem 'p0'"),
])
def test_user_reward_returning_a_non_number_is_named_at_the_first_call(user_module, function, needle):
    reward = load_reward(f"{user_module}:{function}")
    with pytest.raises(RewardError, match=f"reward function {user_module}:{function} {needle}"):
        reward(P("1"), "anything")


@pytest.mark.parametrize("spec, needle", [
    ("builtins:exec", "'builtins' is a Python standard-library module"),
    ("os:popen", "'os' is a Python standard-library module"),
    ("subprocess:run", "'subprocess' is a Python standard-library module"),
    ("kdrl_reliab_user_rewards:score_by_shell", "it is a built-in function"),
])
def test_callables_that_are_not_rewards_are_refused(user_module, spec, needle):
    with pytest.raises(RewardError, match=needle):
        load_reward(spec)
    assert load_reward(f"{user_module}:good")(P("1"), "") == 1.0
