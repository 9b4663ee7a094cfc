"""math-verify equivalence under a CPU-time limit in the calling (main) thread.

math-verify's own timeouts use ``signal.alarm`` with whole seconds of wall-clock time, which
only works in the main thread, silently replaces any other SIGALRM timer, and makes a grade
depend on machine load (a loaded machine gives a verification fewer CPU seconds per wall
second). It is therefore always called with its timeouts disabled, and the whole verification
(parse gold + parse prediction + verify) is guarded here: an ``ITIMER_PROF`` interval timer,
which counts the process's CPU time, fires SIGPROF, whose handler raises a private
``BaseException`` (math-verify and sympy catch ``Exception`` only, so it unwinds the
computation). A previously installed SIGPROF handler and timer are restored and re-armed with
their remaining CPU time afterwards. The worker subprocesses of ``kdrl.rewards.timelimit`` run
this same function in their own (single-threaded) main thread.
"""
from __future__ import annotations

import functools
import logging
import signal
import threading
import time

from kdrl.rewards.extract import _braces_balanced

logger = logging.getLogger("kdrl.rewards")

class _VerifyTimeout(BaseException):
    """Raised by our timer's signal handler; BaseException so library ``except Exception`` won't eat it."""


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


TIMER = getattr(signal, "ITIMER_PROF", None)  # CPU time (user + system) of this process
TIMER_SIGNAL = getattr(signal, "SIGPROF", None)


def _verify_with_alarm(gold: str, pred: str, timeout_s: float) -> str:
    """Main-thread path: a CPU-time alarm of ``timeout_s`` seconds. Returns "1", "0", "T"
    (timeout) or "E"."""
    _import_math_verify()  # never import under the timer
    armed = [True]

    def on_alarm(signum, frame):
        if armed[0]:
            # Re-arm first: if some library swallows this exception with a bare
            # ``except:``, the next alarm interrupts it again.
            signal.setitimer(TIMER, _REARM_S)
            raise _VerifyTimeout()

    if TIMER is None:
        raise _SignalUnavailable("no CPU-time interval timer on this platform")
    try:
        old_handler = signal.signal(TIMER_SIGNAL, on_alarm)
    except (ValueError, OSError, AttributeError) as e:  # not main thread / interpreter
        raise _SignalUnavailable(str(e)) from e
    start = time.process_time()
    old_timer = (0.0, 0.0)
    result = "T"
    try:
        try:
            old_timer = signal.setitimer(TIMER, timeout_s)
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
        signal.setitimer(TIMER, 0)
        signal.signal(TIMER_SIGNAL, old_handler if old_handler is not None else signal.SIG_DFL)
        if old_timer[0] > 0:  # re-arm whoever had the timer before us
            remaining = old_timer[0] - (time.process_time() - start)
            signal.setitimer(TIMER, max(remaining, 1e-6), old_timer[1])
    return result


def _verify_unguarded(gold: str, pred: str) -> str:
    try:
        _import_math_verify()
        return "1" if _verify_core(gold, pred) else "0"
    except Exception:
        logger.debug("math verification failed", exc_info=True)
        return "E"
