"""Training precision: the bytes a tensor occupies and moves under ``fp32`` or ``bf16``.

The captured graph keeps the dtypes the model was built with (fp32 as a rule). Mixed precision
(``bf16``, as Megatron-LM and DeepSpeed train; Rajbhandari et al., ZeRO, 2020) changes only what
the cost model counts, through the two functions here, applied wherever a tensor's bytes are
read for costs:

* :func:`tensor_bytes`: every floating-point tensor (activation, weight as used by its operator,
  gradient) is computed, saved and sent in bf16, 2 bytes per element; integer tensors (token
  ids, targets) keep their captured size. Under ``fp32`` every tensor keeps its captured size.
* :func:`weight_bytes_per_element`: a trained weight keeps, per element of its piece, the bf16
  weight (2) + bf16 gradient (2) + fp32 master weight (4) + k fp32 optimizer states (4 each):
  16 bytes with Adam (k = 2). ZeRO-1 divides the master weight and the states over the
  data-parallel devices, ZeRO-2 also the gradient. Under ``fp32`` it is (2 + k) × the captured
  element size (weight, gradient, states; no separate master copy), divided the same way.

The default precision follows the cluster's device type (:func:`default_precision`): bf16 on
``cuda``, fp32 on ``cpu``. A plan file records the precision it was costed in
(``training.precision``); a file without it was costed in fp32 (:func:`plan_precision`).
No torch here: the runtime maps the names to torch dtypes itself.
"""

from __future__ import annotations

from typing import Any, Mapping

from autoddl.engine.graph import TensorMeta
from autoddl.errors import UserError

PRECISIONS = ("fp32", "bf16")
#: bytes per element of a floating-point tensor as computed and communicated (bf16 only:
#: fp32 keeps the captured dtype's size)
BF16_BYTES = 2
#: bytes per element of the fp32 master weight and of each optimizer state under bf16
MASTER_BYTES = 4
#: what a plan file without ``training.precision`` was costed in (autoddl before precisions)
LEGACY_PRECISION = "fp32"


def check_precision(precision: str) -> str:
    """``precision`` if it is one autoddl knows; else a :class:`UserError`."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def default_precision(device_type: str) -> str:
    """The precision used when none is asked for: bf16 on ``cuda`` devices, fp32 otherwise."""
    return "bf16" if device_type == "cuda" else "fp32"


def resolve_precision(requested: str | None, device_type: str) -> str:
    """``requested`` (checked), or the default of ``device_type`` when it is None: the one place
    the default is decided."""
    if requested is None:
        return default_precision(device_type)
    return check_precision(requested)


def plan_precision(training: Mapping[str, Any]) -> str:
    """The precision a plan file's ``training`` entry was costed in (fp32 when it names none)."""
    return check_precision(str(training.get("precision", LEGACY_PRECISION)))


def tensor_bytes(meta: TensorMeta, precision: str) -> int:
    """Bytes of the whole tensor ``meta`` as computed, saved and sent under ``precision``."""
    if precision == "bf16" and meta.is_float:
        return meta.numel * BF16_BYTES
    return meta.nbytes


def weight_bytes_per_element(meta: TensorMeta, precision: str, states: int,
                             divisor: int = 1, divide_grad: bool = False) -> float:
    """Bytes a trained weight keeps per element of its piece: the weight as used, its gradient,
    (bf16) its fp32 master copy, and ``states`` optimizer states. ``divisor`` > 1: ZeRO-1 divides
    the master copy and the states over that many devices; ``divide_grad`` (ZeRO-2) the gradient
    too."""
    if precision == "bf16" and meta.is_float:
        weight = grad = BF16_BYTES
        kept = MASTER_BYTES + states * MASTER_BYTES
    else:
        weight = grad = meta.itemsize
        kept = states * meta.itemsize
    if divide_grad:
        return weight + (grad + kept) / divisor
    return weight + grad + kept / divisor
