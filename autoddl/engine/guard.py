"""The user's code (a ``file.py:factory`` model: its import, its factory, its forward under
capture) runs inside :func:`user_code`, which turns what that code can do to the process into one
line a user can act on:

- ``sys.exit(...)`` and ``os._exit(...)`` end the capture with an error instead of ending the
  command with exit code 0 and no output (``os._exit`` is replaced for the duration; it cannot be
  caught otherwise);
- endless recursion (``RecursionError``) and any other exception the factory raises name the
  model and the exception's first line;
- a factory or forward that never returns is stopped after :func:`capture_time_limit_s` seconds
  (``AUTODDL_CAPTURE_TIMEOUT_S``, default 600), by ``SIGALRM`` in the main thread.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

from autoddl.errors import UserError, first_line

#: environment variable: seconds that building and capturing a model may take
TIMEOUT_ENV = "AUTODDL_CAPTURE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0


def capture_time_limit_s() -> float:
    """Seconds building and capturing a model may take (``AUTODDL_CAPTURE_TIMEOUT_S``)."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0 or value != value:
        raise UserError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return value


class _Exited(BaseException):
    """The user's code called ``os._exit`` (replaced while it runs)."""

    def __init__(self, code: object) -> None:
        super().__init__(code)
        self.code = code


class _TimedOut(BaseException):
    """The user's code ran past the capture time limit."""


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    """Raise :class:`_TimedOut` in the main thread after ``seconds`` (nothing elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ring(signum, frame):
        raise _TimedOut()

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def user_code(what: str, foreign: bool = True) -> Iterator[None]:
    """Run the block, which builds and captures a model (``what`` names it, e.g. ``--model
    net.py:make``), turning exits, endless recursion and a hang into :class:`UserError`, and,
    where the code is the user's own (``foreign``), any exception too (:class:`UserError`
    passes through; a built-in model's exception is a bug and propagates)."""
    real_exit = os._exit

    def refused_exit(code: int = 0) -> None:
        raise _Exited(code)

    limit_s = capture_time_limit_s()
    os._exit = refused_exit  # type: ignore[assignment]
    try:
        with _alarm(limit_s):
            yield
    except UserError:
        raise
    except (SystemExit, _Exited) as exc:
        how = "os._exit" if isinstance(exc, _Exited) else "sys.exit"
        raise UserError(f"{what}: the model's code called {how}({exc.code!r}) while it was "
                        "built or captured; remove that call from the model file") from None
    except _TimedOut:
        raise UserError(f"{what}: building and capturing the model took more than "
                        f"{limit_s:g} s (does its code loop forever?); fix the model or raise "
                        f"{TIMEOUT_ENV}") from None
    except RecursionError:
        raise UserError(f"{what}: the model's code recursed without end (RecursionError, "
                        f"limit {sys.getrecursionlimit()}); fix the model") from None
    except Exception as exc:
        too_big = isinstance(exc, (OverflowError, MemoryError)) or "overflow" in str(exc).lower()
        if too_big:
            raise UserError(f"{what}: the model is too large to build or capture "
                            f"({type(exc).__name__}: {first_line(exc)}); reduce its sizes") from None
        if not foreign:
            raise
        raise UserError(f"{what}: the model's code raised {type(exc).__name__}: "
                        f"{first_line(exc)}") from exc
    finally:
        os._exit = real_exit  # type: ignore[assignment]
