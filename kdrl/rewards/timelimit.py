"""Where a math verification runs so that its time limit holds (see ``_verify_guarded``).

* Main thread (POSIX), ordinary answers: ``kdrl.rewards.mathcheck``'s alarm. No subprocess.
* Any other thread, and "risky" answers from any thread (``_RISKY``: ``^``, ``!``, binomials,
  Gamma, ... which can make sympy run huge-integer C arithmetic that holds the GIL and, with
  gmpy2/flint ground types, never returns to the interpreter): a pool of long-lived worker
  subprocesses (``python -c`` importing ``kdrl.rewards.mathcheck``; no fork of the caller, so it
  is safe in threaded/CUDA processes). The worker enforces the limit with the same alarm in its
  own main thread; the caller kills a worker stuck in C code once the worker has used
  ``timeout_s + _HARD_KILL_GRACE_S`` seconds of CPU (read from /proc; where there is none, of
  wall-clock time), or after ``_WALL_BACKSTOP_FACTOR`` times that in wall-clock time whatever
  the load (a worker that is blocked rather than computing). Worker start-up (importing sympy, ~1-2 s, once per worker) is not
  counted.
* Last resort, when no worker subprocess can be started: main thread -> the alarm; other
  threads -> risky answers are refused (scored 0.0, counted as timeouts) and the rest run in a
  daemon thread joined with the limit and abandoned on timeout (at most
  ``_MAX_ABANDONED_THREADS`` alive, beyond which verifications are refused).
"""
from __future__ import annotations

import atexit
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
from pathlib import Path
from typing import Any, Optional

from kdrl.rewards import mathcheck, stats
from kdrl.rewards.mathcheck import _SignalUnavailable, _verify_unguarded, _verify_with_alarm

logger = logging.getLogger("kdrl.rewards")

_HARD_KILL_GRACE_S = 1.0  # extra wait before killing a worker subprocess
_WORKER_START_TIMEOUT_S = 120.0
_WORKER_RETRY_AFTER_S = 60.0
_MAX_ABANDONED_THREADS = 4
_WALL_BACKSTOP_FACTOR = 20.0
_POLL_SLICE_S = 0.05  # how often the caller reads a busy worker's CPU time
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU seconds of process ``pid`` so far; None where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime (proc(5) fields 14, 15)
    except (OSError, IndexError, ValueError):
        return None


# The worker imports this very copy of kdrl (its package root first on sys.path), not whichever
# kdrl the interpreter would find.
_WORKER_BOOT = (
    "import sys\n"
    "sys.path.insert(0, sys.argv[1])\n"
    "from kdrl.rewards.timelimit import _worker_main\n"
    "_worker_main()\n"
)
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent.parent)


def _worker_main() -> None:  # pragma: no cover - runs in the subprocess
    """Serve verification requests: one JSON line in, one result code line out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    out_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints can't corrupt the protocol channel
    mathcheck._import_math_verify()
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
            [sys.executable, "-c", _WORKER_BOOT, _PACKAGE_ROOT],
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

    def _readline(self, deadline: float, cpu_budget: Optional[float] = None) -> Optional[bytes]:
        """A line from the worker; None on EOF (worker gone), at the wall-clock ``deadline``, or
        once the worker has used ``cpu_budget`` more CPU seconds (when /proc can tell)."""
        fd = self.proc.stdout.fileno()
        cpu_start = _cpu_seconds(self.proc.pid) if cpu_budget is not None else None
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            wait = remaining if cpu_start is None else min(remaining, _POLL_SLICE_S)
            if not self._poll.poll(math.ceil(wait * 1000)):
                if cpu_start is not None:
                    used = _cpu_seconds(self.proc.pid)
                    if used is None or used - cpu_start > cpu_budget:
                        return None
                continue
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
        budget = timeout_s + _HARD_KILL_GRACE_S
        if _cpu_seconds(self.proc.pid) is None:  # no /proc: wall-clock time is all there is
            line = self._readline(time.monotonic() + budget)
        else:
            line = self._readline(time.monotonic() + max(budget, 0.0) * _WALL_BACKSTOP_FACTOR + 1.0, budget)
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
    global _POOL_LOCK
    _POOL_LOCK = threading.Lock()
    stats._STATS_LOCK = threading.Lock()
    mathcheck._MV_LOCK = threading.Lock()
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
