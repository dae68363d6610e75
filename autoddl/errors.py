"""Errors a user can cause and fix.

Every error a user can provoke (a bad spec, a missing file, a model that fits no memory, a solver
that found nothing) is a :class:`UserError`: the command line prints its one-line message and exits
with code 2. Internal invariants use ``assert``; anything else escaping is a bug.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: what a
    one-line error quotes of a library's exception."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class UserError(ValueError):
    """A problem in the user's input, with a message that names the problem and the fix."""


class NoRuleError(UserError):
    """An operator in the captured graph has no sharding rule."""


class InfeasibleError(UserError):
    """No plan satisfies the constraints (memory per device, divisibility)."""


class SolverError(UserError):
    """The solver returned no usable solution (time-out before a first plan, or a failure)."""


#: a rank's exit code when ``autoddl run --check`` found a mismatch (the run itself went through)
CHECK_FAILED = 3


class Terminated(BaseException):
    """SIGTERM arrived (:func:`raise_on_sigterm`): unwinds like Ctrl-C's KeyboardInterrupt, so
    every ``finally`` runs (temporary files removed, child processes stopped)."""


@contextlib.contextmanager
def raise_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread of this process
    (a forked child that inherits the handler dies of the signal as usual)."""
    import os

    owner = os.getpid()

    def on_term(signum, frame):
        if os.getpid() != owner:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
