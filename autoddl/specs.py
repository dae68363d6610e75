"""Parsing of ``name:key=value,key=value`` specs used by ``--model`` and ``--cluster``."""

from __future__ import annotations

from typing import Mapping

from autoddl.errors import UserError


def parse_spec(spec: str, what: str) -> tuple[str, dict[str, str]]:
    """Split ``name:k=v,k=v`` into the name and a dict of raw string values.

    ``what`` names the option (e.g. ``"--model"``) for error messages.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"{what}: empty spec; expected NAME or NAME:key=value,...")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        raise UserError(f"{what}: spec {spec!r} has no name before ':'")
    params: dict[str, str] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or not key or not value:
                raise UserError(f"{what}: {item.strip()!r} in {spec!r} is not key=value")
            if key in params:
                raise UserError(f"{what}: key {key!r} given twice in {spec!r}")
            params[key] = value
    return name, params


def check_keys(params: Mapping[str, str], allowed: Mapping[str, object], what: str) -> None:
    """Reject keys not in ``allowed`` with a message listing the accepted ones."""
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise UserError(
            f"{what}: unknown key {unknown[0]!r}; accepted keys: {', '.join(sorted(allowed))}"
        )


def as_int(params: Mapping[str, str], key: str, default: int, what: str, minimum: int = 1) -> int:
    """Read an integer parameter ``key`` (at least ``minimum``), or ``default`` if absent."""
    if key not in params:
        return default
    raw = params[key]
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"{what}: {key}={raw!r} is not an integer") from None
    if value < minimum:
        raise UserError(f"{what}: {key}={value} must be at least {minimum}")
    return value


def as_float(
    params: Mapping[str, str], key: str, default: float, what: str, positive: bool = True,
    bounds: tuple[float, float] | None = None,
) -> float:
    """Read a float parameter ``key`` (positive and finite unless told; within ``bounds``, both
    included, if given), or ``default``."""
    if key not in params:
        return default
    raw = params[key]
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"{what}: {key}={raw!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise UserError(f"{what}: {key}={raw!r} must be finite")
    if positive and value <= 0:
        raise UserError(f"{what}: {key}={raw!r} must be positive")
    if bounds is not None and value < bounds[0]:
        raise UserError(f"{what}: {key}={raw!r} must be >= {bounds[0]:g}")
    if bounds is not None and value > bounds[1]:
        raise UserError(f"{what}: {key}={raw!r} is above the plausible maximum {bounds[1]:g}; "
                        "check the value and its unit")
    return value


#: the values of ``--objective``: the predicted step time (default) or the bytes each device sends
OBJECTIVES = ("step", "bytes")
DEFAULT_OBJECTIVE = OBJECTIVES[0]


def check_objective(name: str) -> str:
    """``name`` if it is an objective, else :class:`UserError` with the choices."""
    if name not in OBJECTIVES:
        raise UserError(f"unknown objective {name!r}; choose step (the step time, default) or "
                        "bytes (bytes each device sends per step)")
    return name
