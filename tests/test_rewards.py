"""Tests for kdrl.rewards: extraction, math/exact/format rewards, user functions, registry,
and property-based safety (never raises, bounded time, value in [0, 1])."""
from __future__ import annotations

import importlib
import logging
import math
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdrl.rewards import (
    REWARDS,
    combine_rewards,
    exact_match_reward,
    extract_last_boxed,
    format_reward,
    get_reward,
    load_reward,
    math_reward,
    register_reward,
    reset_reward_stats,
    reward_stats,
)
from kdrl.rewards import mathcheck, timelimit


@dataclass
class P:  # duck-typed Problem
    answer: str
    id: str = "p0"
    prompt: str = "What is it?"
    solution: Optional[str] = None
    metadata: dict[str, Any] = field(default_factory=dict)


TIMEOUT = 1.0  # limit used by the property tests
SLACK = 1.5  # allowed overrun (alarm latency, loaded CI machines)


def wall_bound(cpu_limit_s: float) -> float:
    """Wall-clock seconds a CPU-time limit of ``cpu_limit_s`` (plus the worker's kill grace) may
    take on this machine: a loaded machine gives each process a fraction of a core."""
    import os

    share = max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))
    return (cpu_limit_s + timelimit._HARD_KILL_GRACE_S) * share + SLACK


@pytest.fixture(scope="module", autouse=True)
def warm_worker():
    """Start a verifier subprocess up front: its one-off start-up (importing sympy) is not
    part of any time limit, so the timing assertions below must not include it."""
    assert math_reward(P("1024"), r"\boxed{2^{10}}") == 1.0  # "risky" answer: runs on a worker
    yield


# ------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{1} then \boxed{2} finally \boxed{3}", "3"),
        (r"\boxed{\boxed{4}}", "4"),
        (r"\boxed{1", None),
        (r"\boxed{2} and later \boxed{3", None),  # last one is unbalanced
        (r"answer: \boxed 5", "5"),
        (r"$\boxed 5$.", "5"),
        (r"\fbox{7}", "7"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),  # escaped braces don't count
        (r"\boxed {x + 1}", "x + 1"),
        (r"\boxedfoo{3} \boxed{4}", "4"),
        (r"\boxedx \fbox{1} \boxedy", "1"),
        (r"\fbox{3} \boxed{2}", "2"),
        (r"\[\boxed 5\]", "5"),
        (r"\boxed 5}", None),
        (r"\boxed{}", ""),
        ("", None),
        ("no box here", None),
        (r"\boxed", None),
        ("\\boxed{" * 10000 + "}" * 10000, ""),
        ("\\boxed{" * 10000, None),
    ],
)
def test_extract_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


def test_extract_non_string():
    assert extract_last_boxed(None) is None  # type: ignore[arg-type]


def test_extract_linear_on_huge_input():
    text = "x" * 1_000_000 + r"\boxed{" + "{" * 200_000 + "a" + "}" * 200_000 + "}"
    t = time.perf_counter()
    assert extract_last_boxed(text) == "{" * 200_000 + "a" + "}" * 200_000
    assert time.perf_counter() - t < 2.0


# ------------------------------------------------------------------------ math


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        (r"The answer is \boxed{0.5}", "1/2", 1.0),
        (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{3}", "4", 0.0),
        (r"\boxed{9}", "9", 1.0),
        ("9", "9", 0.0),  # no box
        (r"\boxed{}", "0", 0.0),
        (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}", 1.0),
        (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", 1.0),
        (r"\boxed{x = 3}", "3", 1.0),
        (r"\boxed{3} wait no \boxed{4}", "3", 0.0),
    ],
)
def test_math_reward(response, gold, expected):
    assert math_reward(P(gold), response) == expected


def test_math_fast_path_skips_math_verify(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("math-verify must not be called on the fast path")

    monkeypatch.setattr(timelimit, "_verify_guarded", boom)
    reset_reward_stats()
    assert math_reward(P("9"), r"\boxed{9}") == 1.0
    assert math_reward(P(r"\frac{1}{2}"), r"$\boxed{\left( \dfrac{1}{2} \right)}$") == 0.0  # parens differ
    assert math_reward(P(r"\left(\frac{1}{2}\right)"), r"\boxed{( \dfrac{1}{2} )}") == 1.0
    assert reward_stats()["fast_path"] == 2


def test_math_too_long_answer_is_wrong():
    reset_reward_stats()
    assert math_reward(P("1"), r"\boxed{" + "1+" * 600 + "0}") == 0.0
    assert reward_stats()["too_long"] == 1


def test_math_timeout_counted_and_logged(caplog):
    reward = get_reward("math", timeout_s=0.3)
    reset_reward_stats()
    with caplog.at_level(logging.WARNING, logger="kdrl.rewards"):
        t = time.perf_counter()
        assert reward(P("5"), r"\boxed{9^{9^{9^{9}}}}") == 0.0
        elapsed = time.perf_counter() - t
    assert elapsed < wall_bound(0.3)
    assert reward_stats()["timeouts"] == 1
    assert any("timed out" in r.getMessage() for r in caplog.records)


def test_math_alarm_restores_previous_timer():
    """A caller's own CPU-time timer and handler survive a verification (which uses that timer)."""
    import signal

    fired = []

    def mine(*a):
        fired.append(1)

    old = signal.signal(signal.SIGPROF, mine)
    try:
        signal.setitimer(signal.ITIMER_PROF, 2.0)
        assert get_reward("math", timeout_s=2.0)(P(r"\sqrt{12}"), r"\boxed{2\sqrt{3}}") == 1.0
        assert signal.getsignal(signal.SIGPROF) is mine
        assert 0 < signal.getitimer(signal.ITIMER_PROF)[0] <= 2.05  # re-armed with what was left (tick rounding)
        deadline = time.monotonic() + 10.0
        while not fired and time.monotonic() < deadline:
            pass  # burn CPU: the timer counts CPU time
        assert fired, "the caller's own SIGPROF timer was lost"
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)


def test_math_off_main_thread_uses_guard():
    """Off the main thread signals are unavailable: a worker subprocess enforces the limit."""
    reward = get_reward("math", timeout_s=0.5)
    results: dict[str, Any] = {}

    def run():
        results["warm"] = reward(P("1/2"), r"\boxed{0.5}")  # includes worker start-up
        t = time.perf_counter()
        results["slow"] = reward(P("5"), r"\boxed{9^{9^{9^{9}}}}")
        results["slow_s"] = time.perf_counter() - t
        results["ok"] = reward(P("0.5"), r"\boxed{\frac12}")

    th = threading.Thread(target=run)
    th.start()
    th.join(60)
    assert not th.is_alive()
    assert results["warm"] == 1.0 and results["ok"] == 1.0
    assert results["slow"] == 0.0 and results["slow_s"] < wall_bound(0.5)


def test_math_main_thread_alarm_interrupts(monkeypatch):
    """Non-risky answers are verified in-process under a CPU-time (SIGPROF) interval timer."""
    def spin(gold, pred):
        while True:
            pass

    monkeypatch.setattr(mathcheck, "_verify_core", spin)
    reset_reward_stats()
    t = time.perf_counter()
    assert get_reward("math", timeout_s=0.2)(P(r"\sqrt{12}"), r"\boxed{2\sqrt{3}}") == 0.0  # not a simple number
    assert time.perf_counter() - t < wall_bound(0.2)
    assert reward_stats()["timeouts"] == 1


def test_math_alarm_survives_swallowed_timeout(monkeypatch):
    """Code that swallows the first timeout exception (bare ``except:``) is interrupted again."""
    def swallow(gold, pred):
        try:
            while True:
                pass
        except BaseException:
            pass
        while True:
            pass

    monkeypatch.setattr(mathcheck, "_verify_core", swallow)
    t = time.perf_counter()
    assert get_reward("math", timeout_s=0.2)(P(r"\sqrt{12}"), r"\boxed{2\sqrt{3}}") == 0.0
    assert time.perf_counter() - t < wall_bound(0.2)


def test_math_worker_killed_when_stuck(monkeypatch):
    """A worker that does not answer within the limit + grace is killed and replaced."""
    reward = get_reward("math", timeout_s=1.0)
    assert reward(P("1024"), r"\boxed{2^{10}}") == 1.0  # an idle worker is ready
    monkeypatch.setattr(timelimit, "_HARD_KILL_GRACE_S", -0.9)  # caller gives up at 0.1 s
    t = time.perf_counter()
    assert reward(P("5"), r"\boxed{9^{9^{9^{9}}}}") == 0.0  # worker's own alarm is at 1 s
    assert time.perf_counter() - t < 1.0
    monkeypatch.setattr(timelimit, "_HARD_KILL_GRACE_S", 1.0)
    assert reward(P("1024"), r"\boxed{2^{10}}") == 1.0  # a fresh worker


def test_math_thread_fallback_without_worker(monkeypatch):
    monkeypatch.setattr(timelimit, "_acquire_worker", lambda: None)
    reward = get_reward("math", timeout_s=0.5)
    out: dict[str, float] = {}

    def run():
        out["a"] = reward(P("1/2"), r"\boxed{0.5}")  # daemon thread, joined
        t = time.perf_counter()
        out["b"] = reward(P("5"), r"\boxed{10^{10^{10}}}")  # risky: refused, never started
        out["b_s"] = time.perf_counter() - t

    reset_reward_stats()
    th = threading.Thread(target=run)
    th.start()
    th.join(30)
    assert out["a"] == 1.0 and out["b"] == 0.0 and out["b_s"] < 0.5
    assert reward_stats()["timeouts"] == 1


# ----------------------------------------------------------------- exact/format


@pytest.mark.parametrize(
    "response, gold, expected",
    [
        (r"\boxed{ 42 }", "42", 1.0),
        (r"\boxed{42.0}", "42", 0.0),
        ("work\n\n  42  \n\n", "42", 1.0),
        ("42\nthen 43", "42", 0.0),
        ("", "42", 0.0),
        ("   \n  ", "", 0.0),
        (r"\boxed{1} \boxed{2}", " 2 ", 1.0),
    ],
)
def test_exact_match_reward(response, gold, expected):
    assert exact_match_reward(P(gold), response) == expected


@pytest.mark.parametrize(
    "response, expected",
    [
        (r"so the answer is \boxed{5}", 1.0),
        ("so the answer is $\\boxed{5}$.\n", 1.0),
        ("\\[\\boxed{\\frac{1}{2}}\\]<|im_end|>", 1.0),
        (r"\boxed{5}</s>", 1.0),
        (r"\boxed{5} because reasons", 0.0),
        (r"\boxed{4} no, \boxed{5}", 0.0),
        (r"\boxed{5", 0.0),
        (r"\boxed 5", 0.0),
        (r"\boxed{}", 0.0),
        ("no box", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(response, expected):
    assert format_reward(P("5"), response) == expected


def test_combine_rewards():
    reward = combine_rewards([("math", 1.0), ("format", 0.1)], timeout_s=2.0)
    assert reward(P("1/2"), r"\boxed{0.5}") == pytest.approx(1.1)
    assert reward(P("1/2"), r"\boxed{0.5} done?") == pytest.approx(1.0)
    assert reward(P("1/2"), r"\boxed{3}") == pytest.approx(0.1)
    assert reward(P("1/2"), "nothing") == 0.0
    assert reward.__name__ == "math+0.1*format"
    with pytest.raises(ValueError):
        combine_rewards([], timeout_s=1.0)
    with pytest.raises(ValueError):
        combine_rewards([("math", float("nan"))], timeout_s=1.0)
    with pytest.raises(ValueError, match="did you mean 'format'"):
        combine_rewards([("fromat", 1.0)], timeout_s=1.0)


# -------------------------------------------------------------- registry / users


def test_registry_and_unknown_names():
    assert {"math", "exact", "format"} <= set(REWARDS)
    assert get_reward("exact") is exact_match_reward
    assert get_reward("math", timeout_s=3.0).timeout_s == 3.0
    with pytest.raises(ValueError) as e:
        get_reward("maht")
    msg = str(e.value)
    assert "'maht'" in msg and "exact, format, math" in msg and "did you mean 'math'" in msg
    with pytest.raises(ValueError):
        get_reward("math", timeout_s=0)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"kdrl_user_rewards_{abs(hash(str(tmp_path)))}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        calls = []

        def length_reward(problem, response):
            calls.append(response)
            return min(len(response), 10) / 10

        def explode(problem, response):
            raise RuntimeError("boom")

        def returns_text(problem, response):
            return "1.0"

        def returns_nan(problem, response):
            return float("nan")

        def wants_one_arg(problem):
            return 1.0

        def with_timeout(problem, response, *, timeout_s=5.0):
            return timeout_s

        class Box:
            @staticmethod
            def score(problem, response):
                return True

        NOT_CALLABLE = 3
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield name
    sys.modules.pop(name, None)


def test_load_user_reward(user_module):
    fn = load_reward(f"{user_module}:length_reward")
    assert fn(P("x"), "abcde") == 0.5
    assert get_reward(f"{user_module}:length_reward")(P("x"), "a" * 50) == 1.0
    assert load_reward(f"{user_module}:Box.score")(P("x"), "") == 1.0
    assert get_reward(f"{user_module}:with_timeout", timeout_s=2.5)(P("x"), "") == 2.5
    combined = combine_rewards([(f"{user_module}:length_reward", 2.0), ("exact", 1.0)], timeout_s=1.0)
    assert combined(P("abcde"), "abcde") == pytest.approx(2.0)


def test_user_reward_errors(user_module, caplog):
    with pytest.raises(ValueError, match="not found"):
        load_reward("kdrl_no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no attribute 'lenght_reward'.*length_reward"):
        load_reward(f"{user_module}:lenght_reward")
    with pytest.raises(ValueError, match="not a callable"):
        load_reward(f"{user_module}:NOT_CALLABLE")
    with pytest.raises(ValueError, match=r"\(problem, response\)"):
        load_reward(f"{user_module}:wants_one_arg")
    for bad in ("no_colon", ":f", "mod:", "a:b:c"):
        with pytest.raises(ValueError, match="module:function"):
            load_reward(bad)

    reset_reward_stats()
    explode = load_reward(f"{user_module}:explode")
    with caplog.at_level(logging.WARNING, logger="kdrl.rewards"):
        assert explode(P("x"), "y") == 0.0
        assert explode(P("x"), "z") == 0.0
    assert reward_stats()["user_errors"] == 2
    assert any("explode" in r.getMessage() for r in caplog.records)
    assert reset_reward_stats()["user_errors"] == 2 and reward_stats()["user_errors"] == 0

    with pytest.raises(ValueError, match="returns_text"):
        load_reward(f"{user_module}:returns_text")(P("x"), "y")
    with pytest.raises(ValueError, match="returns_nan.*non-finite"):
        load_reward(f"{user_module}:returns_nan")(P("x"), "y")


def test_register_reward():
    register_reward("always_one_test", lambda problem, response: 1)
    try:
        assert get_reward("always_one_test")(P("x"), "y") == 1.0
        assert combine_rewards([("always_one_test", 0.5)], timeout_s=1.0)(P("x"), "y") == 0.5
    finally:
        REWARDS.pop("always_one_test")


# -------------------------------------------------------------- property-based

FAST_REWARDS = {
    "math": lambda: get_reward("math", timeout_s=TIMEOUT),
    "exact": lambda: get_reward("exact"),
    "format": lambda: get_reward("format"),
}
PROP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
GOLDS = ["1/2", "5", r"\frac{3}{4}", "x^2+1", ""]


def _check_all(response: str, gold: str) -> None:
    t = time.perf_counter()
    box = extract_last_boxed(response)
    assert box is None or isinstance(box, str)
    assert time.perf_counter() - t < SLACK
    for name, make in FAST_REWARDS.items():
        reward = make()
        t = time.perf_counter()
        value = reward(P(gold), response)
        elapsed = time.perf_counter() - t
        assert isinstance(value, float) and math.isfinite(value), name
        assert 0.0 <= value <= 1.0, name
        assert elapsed < wall_bound(TIMEOUT), (name, elapsed)


@PROP
@given(st.text(), st.sampled_from(GOLDS))
def test_prop_arbitrary_text(response, gold):
    _check_all(response, gold)


@PROP
@given(st.text(), st.sampled_from(GOLDS))
def test_prop_boxed_arbitrary_text(inner, gold):
    _check_all("reasoning... \\boxed{" + inner + "}", gold)


_PIECES = st.sampled_from(["\\boxed{", "\\boxed ", "\\fbox{", "{", "}", "\\frac", "\\{", "\\}", "\\\\",
                           "^", "_", "$", "\\sqrt", "!", " ", "\n", ".", "x", "(", ")"]
                          + list("0123456789"))


@PROP
@given(st.lists(_PIECES, max_size=60).map("".join), st.sampled_from(GOLDS))
def test_prop_latex_soup(response, gold):
    _check_all(response, gold)


@settings(max_examples=8, deadline=None)
@given(st.sampled_from(["x", "{", "}", "$", "\\boxed{", "\\boxedx", "\\fbox", "\\", " ", "\n"]),
       st.booleans())
def test_prop_huge_inputs(unit, boxed):
    response = unit * (1_000_000 // len(unit))
    if boxed:
        response = "\\boxed{" + response + "}"
    _check_all(response, "5")


@pytest.mark.parametrize(
    "response",
    [
        "\\boxed{" * 10000 + "}" * 10000,
        "\\boxed{" * 10000,
        "{" * 100000 + "\\boxed{1}" + "}" * 100000,
        "\\boxed{" + "{" * 500 + "1" + "}" * 500 + "}",  # deep but within the length cap
        "\\boxed{" + "\\frac{" * 300 + "1" + "}{2}" * 300 + "}",
        r"\boxed{(10^{100})!}",
        r"\boxed{2^{2^{2^{2^{2^{2}}}}}}",
        r"\boxed{\sqrt[1000000]{2}^{1000000}}",
    ],
)
def test_adversarial_inputs(response):
    _check_all(response, "5")
