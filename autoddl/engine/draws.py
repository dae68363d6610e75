"""Random draws that a model branches on in training, and export failures in one line.

Some models decide in Python on a random draw: OPT's (and BART's, XGLM's, ...) layer drop,
``dropout_probability = torch.rand([])`` then ``if dropout_probability < self.layerdrop:``.
``torch.export`` cannot branch on a tensor's value ("Could not guard on data-dependent
expression"). While a model is exported, :class:`FixedDraws` watches scalar draws of
``torch.rand`` (uniform on [0, 1)) and the comparisons of a draw with a number: where the
outcome is the same for every draw (``u < p`` with p <= 0 is always false: ``layerdrop=0``), the
branch is taken as it always is, so the captured graph is exactly the model, and the runtime,
which executes that graph, reproduces it; the reference (``run --check``) draws and branches the
same way. Where the outcome depends on the draw (``layerdrop=0.1``: a different set of layers
each step), the capture is refused in one line naming the model's code and the fix. The draws
left without a use are removed from the graph (:func:`drop_dead_draws`).

:func:`quiet_export` keeps torch's partial-graph dump and its symbolic-shape warnings of a
failed export off the terminal (the capture then fails in one line); after a successful export
they are written out as usual.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import traceback
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

from autoddl.errors import UserError

#: comparisons of a draw u in [0, 1) with a number c: c -> the outcome for every u, or None
_CERTAIN: dict[str, Callable[[float], bool | None]] = {
    "lt": lambda c: True if c >= 1 else False if c <= 0 else None,
    "le": lambda c: True if c >= 1 else False if c < 0 else None,
    "gt": lambda c: True if c < 0 else False if c >= 1 else None,
    "ge": lambda c: True if c <= 0 else False if c >= 1 else None,
}
_ALIASES = {"less": "lt", "less_equal": "le", "greater": "gt", "greater_equal": "ge"}

_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS = os.path.abspath(__file__)


def _compare_name(func: Any) -> str | None:
    """``lt`` for ``Tensor.__lt__``, ``Tensor.lt``, ``torch.lt`` and ``torch.less``; None for
    anything else."""
    name = getattr(func, "__name__", "").strip("_")
    name = _ALIASES.get(name, name)
    return name if name in _CERTAIN else None


def _model_line() -> str:
    """``file.py:LINE: `code``` of the innermost frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path != _THIS and not path.startswith(_TORCH_DIR) and "contextlib" not in path:
            return f"{os.path.basename(path)}:{frame.lineno}: `{(frame.line or '').strip()}`"
    return "the model's forward"


class FixedDraws(TorchFunctionMode):
    """While active, a comparison of a scalar ``torch.rand`` draw with a number converts to the
    Python bool it is for every draw; where that depends on the draw, :class:`UserError`."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: dict[int, torch.Tensor] = {}  # by id: tensors' == and hash would trace
        self.outcomes: dict[int, tuple[torch.Tensor, bool | None, str]] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        if getattr(func, "__name__", "") == "__bool__" and args and id(args[0]) in self.outcomes:
            _, outcome, what = self.outcomes[id(args[0])]
            if outcome is None:
                raise UserError(
                    f"the model branches on a random draw in training ({_model_line()}, "
                    f"{what}): a different branch each step, which one captured graph cannot "
                    "hold; set that probability to 0 (e.g. layerdrop=0) or 1")
            return outcome
        out = func(*args, **(kwargs or {}))
        if func in (torch.rand, torch.rand_like) and isinstance(out, torch.Tensor) \
                and out.numel() == 1:
            self.draws[id(out)] = out
        elif (name := _compare_name(func)) and len(args) == 2 and id(args[0]) in self.draws \
                and isinstance(args[1], (int, float)) and not isinstance(args[1], bool):
            c = float(args[1])
            self.outcomes[id(out)] = (out, _CERTAIN[name](c), f"a torch.rand draw {name} {c:g}")
        return out


def drop_dead_draws(ep: torch.export.ExportedProgram) -> None:
    """Erase the nodes computed from scalar random draws alone that nothing reads (the draws
    and comparisons :class:`FixedDraws` turned into a fixed branch)."""
    derived: set[torch.fx.Node] = set()
    for fx in ep.graph.nodes:
        if fx.op != "call_function":
            continue
        val = fx.meta.get("val")
        tags = getattr(fx.target, "tags", ())
        scalar_draw = torch.Tag.nondeterministic_seeded in tags and \
            isinstance(val, torch.Tensor) and val.numel() == 1 and not fx.all_input_nodes
        if scalar_draw or (fx.all_input_nodes and all(a in derived for a in fx.all_input_nodes)):
            derived.add(fx)
    for fx in reversed(list(ep.graph.nodes)):
        if fx in derived and not fx.users:
            ep.graph.erase_node(fx)


class _Held(logging.Filter):
    """Holds a logger's records back (:func:`quiet_export`)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


#: torch's loggers that write several lines about a failing export (symbolic shapes' warnings,
#: a fake tensor's traceback)
_QUIET_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._subclasses.fake_tensor")


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Hold back what an export writes to stderr (a failed export prints its partial graph)
    and the records of torch's :data:`_QUIET_LOGGERS`; write them out only if the block
    succeeds."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    held = _Held()
    for logger in loggers:
        logger.addFilter(held)
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(held)
    sys.stderr.write(buffer.getvalue())
    for record in held.records:
        logging.getLogger(record.name).handle(record)


_CALL = re.compile(r"The following call raised this error:\s*\n\s*File \"([^\"]+)\", line (\d+)"
                   r"[^\n]*\n\s*(.+)")


def export_failure(exc: BaseException) -> str:
    """One line for a failed export: where the model branches on a tensor's value, that
    line of the model; else the first line of the error."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    call = _CALL.search(text)
    if "data-dependent" in first and call:
        where = f"{os.path.basename(call.group(1))}:{call.group(2)}: `{call.group(3).strip()}`"
        return (f"the model branches on a tensor's value ({where}), which one captured graph "
                f"cannot hold ({first.split(' (')[0]}); make that branch independent of "
                "tensor values")
    return first
