"""Answer extraction: the last ``\\boxed{...}`` of a response, and the conservative TeX
normalisation of the string fast path. Every function here is linear in its input."""
from __future__ import annotations

import re
from typing import Optional

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
