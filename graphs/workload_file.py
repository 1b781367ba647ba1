"""The checks of a workload file that need no torch: it exists, is Python, reads,
and compiles. The command line runs them before it imports torch (which takes
seconds), so a mistyped path or a syntax error is refused at once; graphs.workload
runs the same checks before it imports the file.
"""

from __future__ import annotations

from pathlib import Path

from graphs.errors import WorkloadError

__all__ = ["check_workload_file", "first_line"]


def check_workload_file(path_str: str) -> Path:
    """The workload file `path_str` as a Path, once it is a readable Python file that compiles.

    Raises
    ------
    WorkloadError : no such file, a directory, not a `.py` file, unreadable, or a syntax error
        (one line naming the file and the line).
    """
    path = Path(path_str)
    if path.is_dir():
        raise WorkloadError(f"{path_str}: is a directory, not a Python file (give the path of the workload's .py file)")
    if not path.is_file():
        raise WorkloadError(f"{path_str}: no such file")
    if path.suffix != ".py":
        raise WorkloadError(f"{path_str}: not a Python file (a workload file ends in .py)")
    try:
        source = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise WorkloadError(f"{path_str}: cannot read it: {exc.strerror or first_line(exc)}") from exc
    try:
        compile(source, str(path), "exec")
    except SyntaxError as exc:
        raise WorkloadError(f"{path_str}: syntax error at line {exc.lineno}: {exc.msg}") from exc
    return path


def first_line(exc: BaseException) -> str:
    """The exception's message cut to one line, for one-line error messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"
