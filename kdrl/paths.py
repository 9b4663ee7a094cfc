"""What is wrong with a path a user gave, in words: missing, a symlink loop, a dangling link, a
FIFO or device (reading one blocks or never ends), a directory, or unreadable.

Every user-facing reader (recipes, data files, model directories) asks here first, so each
fault gets the same one-line message whatever file it hits.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Optional

KINDS = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
         stat.S_IFBLK: "a block device"}


def path_problem(path: Path, want: str = "file") -> Optional[str]:
    """None when ``path`` is a readable regular file (``want="file"``) or directory
    (``want="dir"``); else what it is instead, e.g. "a symlink loop"."""
    try:
        info = os.stat(path)
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "a symlink loop (the link points back at itself)"
        if os.path.islink(path):
            return f"a symlink to {os.readlink(path)}, which does not exist"
        if error.errno == errno.EACCES:
            return "not readable (permission denied)"
        if error.errno == errno.ENOTDIR:
            return "no such file or directory (a part of the path is a file)"
        return "no such file or directory"
    kind = stat.S_IFMT(info.st_mode)
    if kind in KINDS:
        return f"{KINDS[kind]}, not a regular file (reading it would block)"
    if want == "file" and kind == stat.S_IFDIR:
        return "a directory, not a file"
    if want == "dir" and kind != stat.S_IFDIR:
        return "a file, not a directory"
    if not os.access(path, os.R_OK | (os.X_OK if kind == stat.S_IFDIR else 0)):
        return "not readable (permission denied)"
    return None


def describe_nonregular(path: Path) -> Optional[str]:
    """Like ``path_problem`` but a directory is fine (a data path may be either)."""
    problem = path_problem(path, "file")
    return None if problem == "a directory, not a file" else problem
