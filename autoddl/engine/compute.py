"""Compute time of one operator on one device: a roofline with one set of figures per machine.

A training step's compute is not FLOPs at the peak rate. Per operator, on the piece of work one
device runs (its FLOPs and the bytes it reads and writes, divided as its signature divides them):

* **forward** = max(FLOPs / (peak × matmul efficiency), bytes / memory bandwidth) + one kernel's
  fixed overhead, for the matmul class (linear, mm, bmm, addmm, convolution, attention, einsum),
  which tensor cores run at a fraction of the dense peak;
* **forward** = bytes / memory bandwidth + one kernel's overhead for every other operator
  (element-wise, normalizations, softmax, embedding lookups, losses): memory-bound, its FLOPs
  are negligible beside its traffic;
* attention, unless fused on chip, also moves its (tokens × tokens) score matrix through memory
  a few times (:attr:`ComputeFigures.attention_score_passes`), in kernels of their own;
* views (view, reshape, transpose, slice, ...) launch no kernel and take no time;
* **backward** = 2 × forward (a matmul's two gradient matmuls; an element-wise op reads its
  gradient and saved input and writes one gradient), so one training pass is 3 × forward, and 4 ×
  where the forward is recomputed.

The overhead is what makes small kernels slow: dividing a tiny operator over more devices does
not make it faster than a launch. The figures are :class:`ComputeFigures`, one set per machine
kind, with their source: the presets' come from datasheets and published measurements, a cluster
file may give its own (``[compute]``), and ``autoddl calibrate`` measures them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from autoddl.errors import UserError

#: operators tensor cores run (FLOPs-bound when large)
MATMUL_CLASS = frozenset({
    "aten.linear.default", "aten.mm.default", "aten.bmm.default", "aten.matmul.default",
    "aten.addmm.default", "aten.conv2d.default", "aten.convolution.default",
    "aten.scaled_dot_product_attention.default", "aten.einsum.default",
})

#: operators that only relabel memory: no kernel, no time
VIEW_OPS = frozenset({
    "view", "reshape", "_unsafe_view", "transpose", "permute", "t", "expand", "unsqueeze",
    "squeeze", "flatten", "unflatten", "alias", "detach", "slice", "select", "split",
    "split_with_sizes", "unbind", "chunk",
})


@dataclass(frozen=True)
class ComputeFigures:
    """How fast a device computes: the matmul class's fraction of the dense peak, the memory
    bandwidth streaming kernels reach (GB/s, 1e9 bytes), and one kernel's fixed time."""

    matmul_efficiency: float = 1.0
    memory_bandwidth_gbps: float = float("inf")
    kernel_overhead_s: float = 0.0
    source: str = "none given: matmuls at the dense peak, memory-bound ops free"
    #: how often attention's (tokens × tokens) score matrix crosses device memory in a forward:
    #: 0 where attention is fused on chip (FlashAttention); Megatron-LM's 2021 attention writes
    #: it (QK^T), reads and writes it (fused scale-mask-softmax) and reads it (× V): 4
    attention_score_passes: float = 0.0
    #: whether weight traffic (gradient reduction, ZeRO gathers) runs behind compute: GPUs run
    #: collectives on their own streams and engines; a CPU's collectives (gloo) take the cores
    #: that compute
    overlap: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.matmul_efficiency <= 1.0:
            raise UserError(f"matmul_efficiency={self.matmul_efficiency!r} must be in (0, 1]; "
                            "give the fraction of the dense peak large matmuls reach")
        if not self.memory_bandwidth_gbps > 0:
            raise UserError(f"memory_bandwidth_gbps={self.memory_bandwidth_gbps!r} must be "
                            "positive (GB/s, 1e9 bytes per second)")
        if not 0.0 <= self.kernel_overhead_s <= 1.0:
            raise UserError(f"kernel_overhead_s={self.kernel_overhead_s!r} must be in [0, 1] s")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (infinite bandwidth written as 0: not modelled)."""
        bw = self.memory_bandwidth_gbps
        return {"matmul_efficiency": float(self.matmul_efficiency),
                "memory_bandwidth_gbps": 0.0 if bw == float("inf") else float(bw),
                "kernel_overhead_s": float(self.kernel_overhead_s), "overlap": self.overlap,
                "attention_score_passes": float(self.attention_score_passes),
                "source": self.source}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "compute") -> "ComputeFigures":
        """Read :meth:`to_dict` output or a cluster file's ``[compute]`` table (which may give
        ``kernel_overhead_us`` instead of ``kernel_overhead_s``)."""
        if not isinstance(data, Mapping):
            raise UserError(f"{where}: must be a table of matmul_efficiency, "
                            "memory_bandwidth_gbps, kernel_overhead_us")
        allowed = {"matmul_efficiency", "memory_bandwidth_gbps", "kernel_overhead_s",
                   "kernel_overhead_us", "overlap", "attention_score_passes", "source"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise UserError(f"{where}: unknown key {unknown[0]!r}; allowed: "
                            f"{', '.join(sorted(allowed))}")
        try:
            eff = float(data.get("matmul_efficiency", 1.0))
            bw = float(data.get("memory_bandwidth_gbps", 0.0)) or float("inf")
            over = (float(data["kernel_overhead_us"]) * 1e-6 if "kernel_overhead_us" in data
                    else float(data.get("kernel_overhead_s", 0.0)))
            score_passes = float(data.get("attention_score_passes", 0.0))
        except (TypeError, ValueError):
            raise UserError(f"{where}: matmul_efficiency, memory_bandwidth_gbps and "
                            "kernel_overhead_us must be numbers") from None
        overlap = data.get("overlap", True)
        if not isinstance(overlap, bool):
            raise UserError(f"{where}: overlap={overlap!r} must be true or false")
        if score_passes < 0:
            raise UserError(f"{where}: attention_score_passes={score_passes!r} must be >= 0")
        return cls(eff, bw, over, str(data.get("source", f"given in {where}")),
                   score_passes, overlap)


#: the presets' figures (``autoddl.engine.cluster``), with where they come from
PRESET_COMPUTE: dict[str, ComputeFigures] = {
    "cpu": ComputeFigures(
        1.0, 10.0, 10e-6,
        "nominal: matmuls at the nominal peak, 10 GB/s memory, 10 µs per operator, no "
        "overlap of communication with compute (gloo computes on the same cores); calibrate",
        overlap=False),
    "dgx-a100": ComputeFigures(
        0.70, 1600.0, 4e-6,
        "published: bf16 GEMMs of transformer shapes on A100 reach 70-80 % of the 312 TFLOP/s "
        "peak (cuBLAS; the low end taken, ~220 TFLOP/s); "
        "streaming kernels about 80 % of the 2,039 GB/s HBM2e datasheet figure; ~4 µs per "
        "kernel launch; attention as Megatron-LM (2021) runs it on A100, the score matrix "
        "through memory 4 times per forward", attention_score_passes=4.0),
    "dgx-h100": ComputeFigures(
        0.70, 2700.0, 4e-6,
        "published: large bf16 GEMMs on H100 SXM reach about 70 % of the 989 TFLOP/s peak "
        "(cuBLAS); streaming kernels about 80 % of the 3,350 GB/s HBM3 datasheet figure; ~4 µs "
        "per kernel launch; attention fused on chip (FlashAttention)"),
}


def is_view(target: str) -> bool:
    """Whether an ATen target only relabels memory (no kernel)."""
    parts = target.split(".")
    return len(parts) > 1 and parts[1] in VIEW_OPS


def forward_seconds(target: str, flops: float, bytes_moved: float, peak_flops: float,
                    figures: ComputeFigures, score_bytes: float = 0.0) -> float:
    """One device's forward time of an operator doing ``flops`` on ``bytes_moved`` bytes
    (attention: ``score_bytes``, its score matrix, crosses memory
    :attr:`ComputeFigures.attention_score_passes` times in separate kernels)."""
    if flops == 0.0 and is_view(target):
        return 0.0
    bandwidth = figures.memory_bandwidth_gbps * 1e9
    memory_s = bytes_moved / bandwidth
    if target in MATMUL_CLASS:
        scores_s = figures.attention_score_passes * score_bytes / bandwidth
        return max(flops / (peak_flops * figures.matmul_efficiency), memory_s) + scores_s \
            + figures.kernel_overhead_s
    return memory_s + figures.kernel_overhead_s
