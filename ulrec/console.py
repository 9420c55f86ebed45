"""What the terminal shows while a command runs.

Under :func:`routed` the process's own output — file descriptors 1 and 2, so everything a library
writes: Ray's core worker (C++), the worker output Ray forwards to the driver, vLLM, deepctr, W&B,
tqdm bars of other libraries — goes to the run's log file, and the terminal gets only what this
project says to the user (:func:`say`, :func:`note`) and our progress bars when it is a terminal.
Nothing is lost: the log holds the rest. ``ulrec … -v`` (``ULREC_VERBOSE=1``) turns routing off.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import IO, Any, Iterator


class _Route:
    out: IO[str] | None = None  # the user's stdout / stderr while routed
    err: IO[str] | None = None


_ROUTE = _Route()


def say(message: str) -> None:
    """A line for the user (results, stage headers)."""
    print(message, file=_ROUTE.out or sys.stdout, flush=True)


def note(message: str) -> None:
    """A short notice for the user on stderr (a download starting, a setting that has no effect)."""
    print(message, file=_ROUTE.err or sys.stderr, flush=True)
    if _ROUTE.err is not None:  # and in the log, where it explains what follows
        print(message, file=sys.stderr, flush=True)


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def progress_bar(iterable: Any = None, *, enabled: bool = True, **kwargs: Any):
    """A tqdm bar on the user's terminal. Off when the output is not a terminal while routed (a log
    of bar redraws helps nobody: each stage ends with a one-line result instead)."""
    from tqdm.auto import tqdm

    stream = _ROUTE.err if _ROUTE.err is not None else sys.stderr
    if _ROUTE.err is not None and not _is_tty(stream):
        enabled = False
    return tqdm(iterable, file=stream, disable=not enabled, **kwargs)


def _real_fd(stream: Any, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, ValueError, OSError):
        return False


@contextlib.contextmanager
def routed(path: Path, verbose: bool = False) -> Iterator[Path | None]:
    """Send this process's output to ``path`` (appended) for the duration; yields the path, or None
    when routing is off (``verbose``, already routed, or the log cannot be opened)."""
    if verbose or _ROUTE.out is not None:
        yield None
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")
    except OSError:
        yield None
        return
    log.write(f"\n===== ulrec {' '.join(sys.argv[1:])} — {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    streams = (sys.stdout, sys.stderr)
    real = [_real_fd(sys.stdout, 1), _real_fd(sys.stderr, 2)]
    for stream in streams:
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no descriptors 1/2 to route (a detached process): leave output as it is
        log.close()
        yield None
        return
    # The user's streams: a copy of the terminal's descriptor, or the stream object itself when it
    # is not a descriptor (pytest's capsys).
    users = [os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(s, "encoding", None) or "utf-8",
                       errors="replace") if is_real else s
             for fd, s, is_real in ((1, streams[0], real[0]), (2, streams[1], real[1]))]
    _ROUTE.out, _ROUTE.err = users[0], users[1]
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    # Stream objects on descriptors 1/2 now write to the log; others are replaced for the duration.
    if not real[0]:
        sys.stdout = log
    if not real[1]:
        sys.stderr = log
    try:
        yield path
    finally:
        for stream in (sys.stdout, sys.stderr, *streams):
            with contextlib.suppress(Exception):
                stream.flush()
        sys.stdout, sys.stderr = streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        for user, is_real in zip(users, real):
            if is_real:
                user.close()
        _ROUTE.out = _ROUTE.err = None
        if all(real):  # a logging handler made meanwhile holds sys.stderr, never ``log``
            log.close()
