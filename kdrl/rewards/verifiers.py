"""Verifiable rewards: answer extraction, math equivalence, exact match, format, user functions.

A reward is ``Callable[[Problem, str], float]``. Every reward built here is pure,
deterministic, never raises on any response string, never evaluates model text as
code, and never hangs (math verification runs under a time limit).

Time limit for ``math_reward`` (see ``_verify_guarded``)
---------------------------------------------------------
math-verify's own timeouts use ``signal.alarm`` with *whole* seconds, which only works
in the main thread and silently replaces any other SIGALRM timer. We therefore always
call ``math_verify.parse``/``verify`` with their timeouts disabled and guard the whole
verification (parse gold + parse prediction + verify) ourselves:

* Main thread (POSIX): a float ``signal.setitimer(ITIMER_REAL)`` alarm whose handler
  raises a private ``BaseException`` (math-verify and sympy catch ``Exception`` only, so
  it unwinds the computation). A previously installed SIGALRM handler/timer is restored
  and re-armed with its remaining time afterwards. No subprocess, no thread.
* Any other thread, and "risky" answers from any thread (``_RISKY``: ``^``, ``!``,
  binomials, Gamma, ... which can make sympy run huge-integer C arithmetic that holds
  the GIL and, with gmpy2/flint ground types, never returns to the interpreter): the
  verification runs on a pool of long-lived worker subprocesses (``python -c`` loading
  this very file; no fork of the caller, so it is safe in threaded/CUDA processes). The
  worker enforces the limit with the same alarm in its own main thread; the caller waits
  at most ``timeout_s + _HARD_KILL_GRACE_S`` and kills a worker stuck in C code.
  Worker start-up (importing sympy, ~1-2 s, once per worker) is not counted.
* Last resort, when no worker subprocess can be started: main thread -> the alarm;
  other threads -> risky answers are refused (scored 0.0, counted as timeouts) and the
  rest run in a daemon thread joined with the limit and abandoned on timeout (at most
  ``_MAX_ABANDONED_THREADS`` alive, beyond which verifications are refused).

In every mode an extracted answer longer than ``MAX_ANSWER_CHARS`` is rejected as wrong
before math-verify sees it (unless it matches the gold string exactly), and a timeout
scores 0.0, is counted in ``reward_stats()["timeouts"]`` and logged on the
``kdrl.rewards`` logger (rate limited).
"""
from __future__ import annotations

import atexit
import difflib
import functools
import importlib
import inspect
import json
import logging
import math
import numbers
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Union

if TYPE_CHECKING:  # pragma: no cover
    from kdrl.types import Problem  # noqa: F401

logger = logging.getLogger("kdrl.rewards")

DEFAULT_TIMEOUT_S = 5.0
# Extracted answers longer than this are scored 0.0 without calling math-verify.
MAX_ANSWER_CHARS = 1000
_HARD_KILL_GRACE_S = 1.0  # extra wait before killing a worker subprocess
_WORKER_START_TIMEOUT_S = 120.0
_WORKER_RETRY_AFTER_S = 60.0
_MAX_ABANDONED_THREADS = 4


class ProblemLike(Protocol):
    """What the rewards read from a problem (``kdrl.types.Problem`` satisfies it)."""

    id: str
    prompt: str
    answer: str
    solution: Optional[str]
    metadata: dict


RewardFn = Callable[["ProblemLike", str], float]


# --------------------------------------------------------------------------- stats

_STATS_LOCK = threading.Lock()
_STAT_KEYS = (
    "math_calls",  # math verifications requested (a boxed answer was found)
    "fast_path",  # answered by normalized string equality, math-verify skipped
    "too_long",  # answer longer than MAX_ANSWER_CHARS, scored 0.0
    "timeouts",  # verification hit the time limit, scored 0.0
    "errors",  # unexpected internal failure of a built-in reward, scored 0.0
    "user_errors",  # exception raised inside a user reward function, scored 0.0
)
_STATS = dict.fromkeys(_STAT_KEYS, 0)


def _count(key: str) -> int:
    with _STATS_LOCK:
        _STATS[key] += 1
        return _STATS[key]


def reward_stats() -> dict[str, int]:
    """A snapshot of the reward counters (timeouts, user-function errors, ...)."""
    with _STATS_LOCK:
        return dict(_STATS)


def reset_reward_stats() -> dict[str, int]:
    """Zero the counters; returns the values they had."""
    with _STATS_LOCK:
        old = dict(_STATS)
        for k in _STATS:
            _STATS[k] = 0
        return old


def _should_log(n: int) -> bool:
    """Rate limit: log the first 10 occurrences, then every 100th."""
    return n <= 10 or n % 100 == 0


# ---------------------------------------------------------------------- extraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_BRACE_TOKENS = re.compile(r"\\.|[{}]", re.DOTALL)  # no nesting quantifiers: linear


def _match_brace(text: str, open_idx: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_idx``, or -1 if unbalanced.

    Backslash escapes (``\\{``, ``\\}``, ``\\\\``) are skipped. Linear time.
    """
    depth = 0
    for m in _BRACE_TOKENS.finditer(text, open_idx):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return m.start()
    return -1


def _braces_balanced(s: str) -> bool:
    depth = 0
    for m in _BRACE_TOKENS.finditer(s):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


# ``\boxed 5`` / ``\boxed5``: one token, up to whitespace, ``$`` or a closing ``\]`` / ``\)``.
# The alternatives are disjoint (backslash vs not), so matching is linear.
_TOKEN = re.compile(r"[^\s$](?:[^\s$\\]|\\(?![\])]))*")


def _last_box(text: str) -> Optional[tuple[int, int, str, bool]]:
    """Locate the last box: (start, end, content, brace_form) or None.

    None when there is no box or the last one is unbalanced / has no argument. Linear
    time: each command's occurrences are searched right to left exactly once.
    """
    n = len(text)
    found = {cmd: text.rfind(cmd) for cmd in _BOX_COMMANDS}
    while True:
        cmd = max(found, key=found.__getitem__)
        start = found[cmd]
        if start < 0:
            return None
        j = start + len(cmd)
        if j < n and (text[j].isalpha() or text[j] == "@"):
            # A different command, e.g. ``\boxedanswer``: look further back.
            found[cmd] = text.rfind(cmd, 0, start)
            continue
        k = j
        while k < n and text[k].isspace():
            k += 1
        if k >= n:
            return None
        if text[k] == "{":
            close = _match_brace(text, k)
            if close < 0:
                return None
            return start, close + 1, text[k + 1 : close], True
        m = _TOKEN.match(text, k)
        if m is None:
            return None
        token = m.group().rstrip(".,;:")
        if not token or not _braces_balanced(token):
            return None
        return start, m.end(), token, False


def extract_last_boxed(text: str) -> Optional[str]:
    """Contents of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed TOKEN``).

    Nested braces are balanced; escaped braces ``\\{ \\}`` are ignored for balancing.
    Returns None when no box is present or the last one is unbalanced. Linear time.
    """
    if not isinstance(text, str):
        return None
    found = _last_box(text)
    return None if found is None else found[2]


# -------------------------------------------------------------------- normalizing

_NORM_SUBS = [
    (re.compile(r"\\(?:left|right|displaystyle|textstyle)(?![A-Za-z])"), ""),
    (re.compile(r"\\[,;:! ]"), ""),  # TeX spacing commands
    (re.compile(r"\\[dt]frac(?![A-Za-z])"), r"\\frac"),
    (re.compile(r"\s+"), ""),  # whitespace is insignificant in TeX math
]


def _normalize(s: str) -> str:
    """Conservative TeX normalization for the string fast path (meaning preserving)."""
    s = s.strip()
    k = min(len(s) - len(s.lstrip("$")), len(s) - len(s.rstrip("$")))  # matched $...$ pairs
    if 0 < k and 2 * k <= len(s):
        s = s[k : len(s) - k].strip()
    for pat, rep in _NORM_SUBS:
        s = pat.sub(rep, s)
    return s


# --------------------------------------------------------------- math verification


class _VerifyTimeout(BaseException):
    """Raised by our SIGALRM handler; BaseException so library ``except Exception`` won't eat it."""


class _SignalUnavailable(Exception):
    pass


class _DropMathVerifyTimeoutWarning(logging.Filter):
    # We disable math-verify's own (signal.alarm) timeouts on purpose and guard the call
    # ourselves, so its "Timeout is disabled ..." warning is noise.
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


_MV_LOCK = threading.Lock()
_MV_READY = False


def _import_math_verify() -> None:
    """Import math-verify (outside any timer) and silence its timeout-disabled warning."""
    global _MV_READY
    if _MV_READY:
        return
    with _MV_LOCK:
        if _MV_READY:
            return
        import math_verify  # noqa: F401

        flt = _DropMathVerifyTimeoutWarning()
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(flt)
        _MV_READY = True


def _wrap_for_parse(s: str) -> str:
    return "\\boxed{" + s + "}" if _braces_balanced(s) else "$" + s + "$"


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    from math_verify import parse

    if "\\boxed" in gold or "$" in gold:
        parsed = parse(gold, parsing_timeout=None)
    else:
        parsed = parse(_wrap_for_parse(gold), parsing_timeout=None)
        if not parsed:
            parsed = parse(gold, parsing_timeout=None)
    return tuple(parsed)


def _verify_core(gold: str, pred: str) -> bool:
    """math-verify equivalence with its own timeouts disabled (callers guard the time)."""
    from math_verify import parse, verify

    gold_parsed = _parse_gold(gold)
    if not gold_parsed:
        return False
    pred_parsed = parse(_wrap_for_parse(pred), parsing_timeout=None)
    if not pred_parsed:
        return False
    return bool(verify(list(gold_parsed), pred_parsed, timeout_seconds=None))


_REARM_S = 0.05  # after the first alarm, fire again every 50 ms until we are out


def _verify_with_alarm(gold: str, pred: str, timeout_s: float) -> str:
    """Main-thread path: ITIMER_REAL alarm. Returns "1", "0", "T" (timeout) or "E"."""
    _import_math_verify()  # never import under the timer
    armed = [True]

    def on_alarm(signum, frame):
        if armed[0]:
            # Re-arm first: if some library swallows this exception with a bare
            # ``except:``, the next alarm interrupts it again.
            signal.setitimer(signal.ITIMER_REAL, _REARM_S)
            raise _VerifyTimeout()

    try:
        old_handler = signal.signal(signal.SIGALRM, on_alarm)
    except (ValueError, OSError, AttributeError) as e:  # not main thread / interpreter
        raise _SignalUnavailable(str(e)) from e
    start = time.monotonic()
    old_timer = (0.0, 0.0)
    result = "T"
    try:
        try:
            old_timer = signal.setitimer(signal.ITIMER_REAL, timeout_s)
            result = "1" if _verify_core(gold, pred) else "0"
        except _VerifyTimeout:
            result = "T"
        except Exception:
            logger.debug("math verification failed", exc_info=True)
            result = "E"
        finally:
            armed[0] = False
    except _VerifyTimeout:  # a re-armed alarm landed while unwinding, before `armed` was cleared
        armed[0] = False
        result = "T"
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler if old_handler is not None else signal.SIG_DFL)
        if old_timer[0] > 0:  # re-arm whoever had the timer before us
            remaining = old_timer[0] - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-6), old_timer[1])
    return result


def _verify_unguarded(gold: str, pred: str) -> str:
    try:
        _import_math_verify()
        return "1" if _verify_core(gold, pred) else "0"
    except Exception:
        logger.debug("math verification failed", exc_info=True)
        return "E"


# ---- worker subprocesses (used off the main thread)

_WORKER_BOOT = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_kdrl_reward_worker', sys.argv[1])\n"
    "mod = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = mod\n"
    "spec.loader.exec_module(mod)\n"
    "mod._worker_main()\n"
)


def _worker_main() -> None:  # pragma: no cover - runs in the subprocess
    """Serve verification requests: one JSON line in, one result code line out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    out_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints can't corrupt the protocol channel
    _import_math_verify()
    _verify_with_alarm("1", "2", 30.0)  # warm sympy up
    os.write(out_fd, b"ready\n")
    for line in sys.stdin.buffer:
        try:
            req = json.loads(line)
            res = _verify_with_alarm(str(req["g"]), str(req["p"]), float(req["t"]))
        except Exception:
            res = "E"
        os.write(out_fd, res.encode() + b"\n")


class _Worker:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self._buf = b""
        self._poll = select.poll()  # not select.select: it fails for fds >= FD_SETSIZE
        self._poll.register(self.proc.stdout.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        line = self._readline(time.monotonic() + _WORKER_START_TIMEOUT_S)
        if line != b"ready":
            self.close()
            raise OSError(f"reward verifier worker did not start (got {line!r})")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _readline(self, deadline: float) -> Optional[bytes]:
        """A line from the worker, None on deadline or EOF (worker gone)."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if not self._poll.poll(math.ceil(remaining * 1000)):
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.strip()

    def verify(self, gold: str, pred: str, timeout_s: float) -> str:
        msg = json.dumps({"g": gold, "p": pred, "t": timeout_s}) + "\n"
        self.proc.stdin.write(msg.encode())
        self.proc.stdin.flush()
        line = self._readline(time.monotonic() + timeout_s + _HARD_KILL_GRACE_S)
        if line is None:
            # Stuck (non-interruptible C code) or died: kill it; a fresh one will be started.
            gone = not self.alive
            self.close()
            return "E" if gone else "T"
        res = line.decode(errors="replace")
        return res if res in ("1", "0", "T", "E") else "E"

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=5)
        except Exception:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:
                pass


_POOL_LOCK = threading.Lock()
_IDLE_WORKERS: list[_Worker] = []
_MAX_IDLE_WORKERS = max(2, os.cpu_count() or 2)
_worker_retry_at = 0.0
_abandoned: list[threading.Thread] = []


def _acquire_worker() -> Optional[_Worker]:
    global _worker_retry_at
    with _POOL_LOCK:
        while _IDLE_WORKERS:
            w = _IDLE_WORKERS.pop()
            if w.alive:
                return w
            w.close()
        if time.monotonic() < _worker_retry_at:
            return None
    try:
        return _Worker()
    except Exception as e:
        with _POOL_LOCK:
            _worker_retry_at = time.monotonic() + _WORKER_RETRY_AFTER_S
        logger.warning(
            "could not start a reward verifier subprocess (%s); off-main-thread math "
            "verification falls back to abandoning timed-out threads", e)
        return None


def _release_worker(w: _Worker) -> None:
    with _POOL_LOCK:
        if w.alive and len(_IDLE_WORKERS) < _MAX_IDLE_WORKERS:
            _IDLE_WORKERS.append(w)
            return
    w.close()


def _after_fork_in_child() -> None:
    # Workers (and any lock held by another thread at fork time) belong to the parent.
    global _POOL_LOCK, _STATS_LOCK, _MV_LOCK
    _POOL_LOCK = threading.Lock()
    _STATS_LOCK = threading.Lock()
    _MV_LOCK = threading.Lock()
    _IDLE_WORKERS.clear()
    _abandoned.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def shutdown_verifier_workers() -> None:
    """Stop idle verifier subprocesses (they also exit on their own when we exit)."""
    with _POOL_LOCK:
        workers = list(_IDLE_WORKERS)
        _IDLE_WORKERS.clear()
    for w in workers:
        w.close()


def _verify_in_thread(gold: str, pred: str, timeout_s: float) -> str:
    """Last resort: run in a daemon thread, abandon it on timeout."""
    with _POOL_LOCK:
        _abandoned[:] = [t for t in _abandoned if t.is_alive()]
        if len(_abandoned) >= _MAX_ABANDONED_THREADS:
            return "T"
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(_verify_unguarded(gold, pred)),
                         name="kdrl-reward-verify", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        with _POOL_LOCK:
            _abandoned.append(t)
        return "T"
    return box[0] if box else "E"


def _verify_in_worker(gold: str, pred: str, timeout_s: float) -> Optional[str]:
    """Run on a worker subprocess; None when no worker can be had."""
    if not _WORKERS_SUPPORTED:
        return None
    for _ in range(2):  # retry once if an idle worker had died meanwhile
        w = _acquire_worker()
        if w is None:
            return None
        try:
            res = w.verify(gold, pred, timeout_s)
        except (BrokenPipeError, OSError):
            w.close()
            continue
        if w.alive:
            _release_worker(w)
        return res
    return "E"


_WORKERS_SUPPORTED = os.name == "posix" and hasattr(select, "poll")

# Answers that can make sympy do huge-integer arithmetic (power towers, factorials,
# binomials, Gamma, exp/sum/prod). CPython's own big-int pow checks for signals, so the alarm
# interrupts it, but it holds the GIL (a watchdog *thread* can't help) and with gmpy2 /
# python-flint ground types the C code never returns to the interpreter. These answers
# are therefore verified on a killable worker subprocess, even from the main thread.
_RISKY = re.compile(
    r"\^|!|\*\*|\\(?:[dt]?binom|choose|exp|prod|sum|Gamma|gamma|operatorname|uparrow|Uparrow)(?![A-Za-z])")


def _verify_guarded(gold: str, pred: str, timeout_s: float) -> str:
    """Verify under the time limit; see the module docstring. Returns "1"/"0"/"T"/"E"."""
    risky = _RISKY.search(pred) is not None
    main = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if main and not risky:
        try:
            return _verify_with_alarm(gold, pred, timeout_s)
        except _SignalUnavailable:
            main = False
    res = _verify_in_worker(gold, pred, timeout_s)
    if res is not None:
        return res
    # No worker subprocess could be started.
    if main:
        try:
            return _verify_with_alarm(gold, pred, timeout_s)  # best effort for risky answers
        except _SignalUnavailable:
            pass
    if risky:
        return "T"  # refused: a runaway big-int computation would freeze the whole process
    return _verify_in_thread(gold, pred, timeout_s)


def _check_timeout(timeout_s: Any) -> float:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real) \
            or not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive finite number of seconds, got {timeout_s!r}")
    return float(timeout_s)


# ------------------------------------------------------------------ built-in rewards


def _gold(problem: Any) -> str:
    answer = getattr(problem, "answer", None)
    return "" if answer is None else str(answer)


def math_reward(problem: "ProblemLike", response: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """1.0 if the last boxed answer is mathematically equivalent to ``problem.answer``.

    Uses math-verify (``verify(parse(gold), parse(pred))``) under a ``timeout_s`` limit;
    no boxed answer, a timeout, or any failure scores 0.0.
    """
    try:
        pred = extract_last_boxed(response)
        if pred is None or not pred.strip():
            return 0.0
        gold = _gold(problem)
        if not gold.strip():
            return 0.0
        _count("math_calls")
        if _normalize(pred) == _normalize(gold):
            _count("fast_path")
            return 1.0
        if len(pred) > MAX_ANSWER_CHARS:
            _count("too_long")
            return 0.0
        try:
            timeout_s = _check_timeout(timeout_s)
        except ValueError:
            timeout_s = DEFAULT_TIMEOUT_S
        res = _verify_guarded(gold, pred, timeout_s)
        if res == "T":
            n = _count("timeouts")
            if _should_log(n):
                logger.warning("math verification timed out after %.3g s (problem %s; %d timeouts so far)",
                               timeout_s, getattr(problem, "id", "?"), n)
            return 0.0
        if res == "E":
            _count("errors")
            return 0.0
        return 1.0 if res == "1" else 0.0
    except _VerifyTimeout:  # defensive: cannot escape _verify_with_alarm in practice
        _count("timeouts")
        return 0.0
    except Exception:
        n = _count("errors")
        if _should_log(n):
            logger.warning("math_reward failed; scoring 0.0", exc_info=True)
        return 0.0


def exact_match_reward(problem: "ProblemLike", response: str) -> float:
    """1.0 if the last boxed answer (else the last non-empty line) equals ``problem.answer``
    after stripping surrounding whitespace."""
    try:
        if not isinstance(response, str):
            return 0.0
        pred = extract_last_boxed(response)
        if pred is None:
            tail = response.rstrip()
            cut = max(tail.rfind("\n"), tail.rfind("\r"))
            pred = tail[cut + 1 :]
        pred = pred.strip()
        return 1.0 if pred and pred == _gold(problem).strip() else 0.0
    except Exception:
        n = _count("errors")
        if _should_log(n):
            logger.warning("exact_match_reward failed; scoring 0.0", exc_info=True)
        return 0.0


# What may follow the final box: closing math delimiters, a full stop, end-of-text markers.
END_MARKERS = (
    "$", "\\]", "\\)", ".", "</answer>", "</s>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>",
    "<|end|>", "<eos>", "<end_of_turn>", "<｜end▁of▁sentence｜>",
)


def _only_end_markers(text: str, i: int) -> bool:
    n = len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        for m in END_MARKERS:
            if text.startswith(m, i):
                i += len(m)
                break
        else:
            return False
    return True


def format_reward(problem: "ProblemLike", response: str) -> float:
    """1.0 if the response has exactly one well-formed, non-empty ``\\boxed{...}`` and
    nothing but whitespace / end markers (``END_MARKERS``) after it."""
    try:
        if not isinstance(response, str):
            return 0.0
        if response.count("\\boxed") + response.count("\\fbox") != 1:
            return 0.0
        found = _last_box(response)
        if found is None:
            return 0.0
        _, end, content, brace_form = found
        if not brace_form or not content.strip():
            return 0.0
        return 1.0 if _only_end_markers(response, end) else 0.0
    except Exception:
        n = _count("errors")
        if _should_log(n):
            logger.warning("format_reward failed; scoring 0.0", exc_info=True)
        return 0.0


# ------------------------------------------------------------------ user functions


class UserReward:
    """A user reward function made safe: an exception inside it scores 0.0 (logged and
    counted in ``reward_stats()["user_errors"]``). Returning a non-number or a non-finite
    number is a bug in the function and raises ``ValueError`` naming it."""

    def __init__(self, fn: Callable[..., Any], name: Optional[str] = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", None) or repr(fn)
        self.__name__ = self.name
        self.__doc__ = getattr(fn, "__doc__", None)
        self._errors = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"UserReward({self.name!r})"

    def __call__(self, problem: "ProblemLike", response: str, **kwargs: Any) -> float:
        try:
            value = self.fn(problem, response, **kwargs)
        except Exception:
            _count("user_errors")
            with self._lock:
                self._errors += 1
                n = self._errors
            if _should_log(n):
                logger.warning("reward function %s raised (error #%d); scoring 0.0",
                               self.name, n, exc_info=True)
            return 0.0
        return _as_finite_float(value, self.name)


def _as_finite_float(value: Any, name: str) -> float:
    if isinstance(value, (str, bytes, complex)) or value is None:
        raise ValueError(f"reward function {name} returned {type(value).__name__} {value!r:.80}; "
                         f"expected a finite real number")
    try:
        out = float(value)
    except Exception as e:
        raise ValueError(f"reward function {name} returned {type(value).__name__}, "
                         f"which is not a number") from e
    if not math.isfinite(out):
        raise ValueError(f"reward function {name} returned non-finite value {out}")
    return out


def load_reward(spec: str) -> UserReward:
    """Import ``"package.module:function"`` (the attribute may be dotted, ``module:obj.fn``)
    and return it wrapped as a safe reward (see ``UserReward``)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"reward spec {spec!r} must look like 'module:function'")
    mod_name, _, attr_path = (p.strip() for p in spec.partition(":"))
    if not mod_name or not attr_path:
        raise ValueError(f"reward spec {spec!r} must look like 'module:function'")
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (e.name == mod_name or mod_name.startswith(e.name + ".")):
            raise ValueError(f"cannot load reward {spec!r}: module {mod_name!r} not found "
                             f"(is it on sys.path / PYTHONPATH?)") from e
        raise ValueError(f"cannot load reward {spec!r}: importing {mod_name!r} failed: {e}") from e
    except Exception as e:
        raise ValueError(f"cannot load reward {spec!r}: importing {mod_name!r} failed: "
                         f"{type(e).__name__}: {e}") from e
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None))]
            close = difflib.get_close_matches(attr_path, names, n=1)
            hint = f"; did you mean {mod_name}:{close[0]}?" if close else ""
            raise ValueError(f"cannot load reward {spec!r}: module {mod_name!r} has no "
                             f"attribute {attr_path!r}{hint}") from None
    if not callable(obj):
        raise ValueError(f"cannot load reward {spec!r}: {attr_path!r} is a "
                         f"{type(obj).__name__}, not a callable")
    try:
        inspect.signature(obj).bind(None, "")
    except TypeError:
        raise ValueError(f"cannot load reward {spec!r}: it must accept (problem, response)") from None
    except ValueError:
        pass  # no introspectable signature (some builtins): trust it
    return UserReward(obj, name=spec)


# ------------------------------------------------------------------------ registry

REWARDS: dict[str, Callable[..., float]] = {
    "math": math_reward,
    "exact": exact_match_reward,
    "format": format_reward,
}
_BUILTIN_REWARDS = frozenset(REWARDS.values())


def register_reward(name: str, fn: Callable[..., Any]) -> None:
    """Add a named reward to ``REWARDS`` (wrapped as a safe ``UserReward``)."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"reward name must be a non-empty string without ':', got {name!r}")
    if not callable(fn):
        raise ValueError(f"reward {name!r} must be callable, got {type(fn).__name__}")
    REWARDS[name] = fn if isinstance(fn, UserReward) else UserReward(fn, name=name)


def _accepts_timeout(fn: Callable[..., Any]) -> bool:
    target = fn.fn if isinstance(fn, UserReward) else fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    p = params.get("timeout_s")
    return p is not None and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)


def get_reward(spec: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Callable[["ProblemLike", str], float]:
    """Resolve a registry name (``REWARDS``) or ``"module:function"`` to a reward.

    Rewards that take a ``timeout_s`` keyword (``"math"``) get ``timeout_s`` bound.
    """
    timeout_s = _check_timeout(timeout_s)
    if not isinstance(spec, str):
        raise ValueError(f"reward spec must be a string, got {type(spec).__name__}")
    spec = spec.strip()
    if spec in REWARDS:
        fn = REWARDS[spec]
        if fn not in _BUILTIN_REWARDS and not isinstance(fn, UserReward):
            fn = UserReward(fn, name=spec)
        name = spec
    elif ":" in spec:
        fn = load_reward(spec)
        name = spec
    else:
        valid = sorted(REWARDS)
        close = difflib.get_close_matches(spec, valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown reward {spec!r}: valid names are {', '.join(valid)} "
                         f"(or 'module:function' for a user function){hint}")
    if not _accepts_timeout(fn):
        return fn

    def bound(problem: "ProblemLike", response: str) -> float:
        return fn(problem, response, timeout_s=timeout_s)

    bound.__name__ = bound.__qualname__ = name
    bound.__doc__ = fn.__doc__
    bound.timeout_s = timeout_s  # type: ignore[attr-defined]
    return bound


def combine_rewards(specs_with_weights: list[tuple[Union[str, Callable[..., Any]], float]],
                    timeout_s: float = DEFAULT_TIMEOUT_S) -> Callable[["ProblemLike", str], float]:
    """Weighted sum of rewards, e.g. ``[("math", 1.0), ("format", 0.1)]``.

    A spec is a registry name, ``"module:function"``, or a callable (wrapped safely).
    """
    timeout_s = _check_timeout(timeout_s)
    if not specs_with_weights:
        raise ValueError("combine_rewards needs at least one (spec, weight) pair")
    parts: list[tuple[Callable[..., float], float, str]] = []
    for item in specs_with_weights:
        try:
            spec, weight = item
        except (TypeError, ValueError):
            raise ValueError(f"expected (spec, weight) pairs, got {item!r}") from None
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ValueError(f"weight for reward {spec!r} must be a finite number, got {weight!r}")
        if isinstance(spec, str):
            fn, name = get_reward(spec, timeout_s), spec.strip()
        elif callable(spec):
            fn = spec if isinstance(spec, UserReward) else UserReward(spec)
            name = fn.name
        else:
            raise ValueError(f"reward spec must be a name, 'module:function' or callable, got {spec!r}")
        parts.append((fn, float(weight), name))

    def combined(problem: "ProblemLike", response: str) -> float:
        return float(sum(w * fn(problem, response) for fn, w, _ in parts))

    combined.__name__ = combined.__qualname__ = "+".join(
        n if w == 1.0 else f"{w:g}*{n}" for _, w, n in parts)
    combined.parts = [(n, w) for _, w, n in parts]  # type: ignore[attr-defined]
    return combined
