"""``autoddl calibrate``: measure this machine's links and compute rate; write a cluster file.

(torch is imported by the rank functions only, so the fit and the option checks load fast.)

Ranks run under torchrun (``autoddl calibrate --nproc N -o FILE.toml`` starts N local ones; for
several nodes run ``torchrun --nnodes ... -m autoddl.runtime.calibrate -o FILE.toml`` on each).
The backend follows the device, as in ``autoddl run``: NCCL with one GPU per rank, else gloo.

**Mesh.** ``nodes × devices_per_node`` = ``WORLD_SIZE / LOCAL_WORLD_SIZE × LOCAL_WORLD_SIZE``,
ranks node-major as :mod:`autoddl.engine.cluster` numbers devices. Axis ``intra``: the ranks of
one node; axis ``inter``: the ranks of one local rank across nodes (only with several nodes).
Every group of an axis runs each collective at once, as a plan's groups would.

**Model** (that of :mod:`autoddl.engine.placements`, through its
:func:`~autoddl.engine.placements.collective_cost`). A collective of kind k on an axis of size p,
each device holding T bytes before it, takes

    t = s·α + b/β,   s = latency steps, b = bytes sent per device:
    all_reduce      s = 2(p−1)+1   b = 2(p−1)/p·T
    all_gather      s = p          b = (p−1)·T        (T: the local piece)
    reduce_scatter  s = p          b = (p−1)/p·T
    all_to_all      s = p          b = (p−1)/p·T

with α the latency per ring step and β the bandwidth per device per direction. E.g. p = 2,
α = 10 µs, β = 1 GB/s, an all-reduce of T = 1 MB: s = 3, b = 1 MB, t = 30 µs + 1 ms = 1.03 ms.

**Fit.** t is linear in x = (α, 1/β): t_i = a_i·x with a_i = (s_i, b_i), one row per kind and
size measured on the axis. The timings span orders of magnitude, so the fit minimises the
*relative* error Σ_i ((a_i·x − t_i)/t_i)²: ordinary least squares of the rows a_i/t_i against 1
(columns scaled to unit norm for conditioning). A link needs x ≥ 0: when the unconstrained
optimum has a negative entry, the constrained one (non-negative least squares) lies on the
boundary, so each unknown is fitted alone with the other at 0 and the better kept. 1/β = 0
(infinite bandwidth) is no link: then β is the best rate seen, max_i b_i/t_i, and α is refitted.
The residual reported is the RMS relative error, sqrt(mean(((a_i·x − t_i)/t_i)²)).

**Timing.** For each (axis, kind, size): one warm-up, then ``reps`` times [barrier on the
group, (CUDA: synchronize), clock, collective, (CUDA: synchronize), clock]; the median per rank,
then the maximum over all ranks (the slowest device bounds a step), so every rank fits the same
numbers. T is rounded to a multiple of p float32 elements, so every kind divides it evenly.

**Compute and memory.** An n×n matmul (float32, n = 1024 on CPU; bf16, n = 8192 on CUDA), 2n³
FLOP, one warm-up and the median of 5; the minimum over ranks, all measuring at once. On CPU each
rank uses ``OMP_NUM_THREADS`` cores (1 under ``autoddl``), the rate its ranks will see. Memory
per device: CUDA, the device's total memory; CPU, physical memory (or the cgroup's limit, if
lower) divided among the node's ranks.

**One process per node** (e.g. one GPU): no axis has size > 1 and there is nothing to fit. The
file then holds the nominal link of the device type's preset (``cpu``: 5 GB/s, 50 µs;
``cuda``: ``dgx-h100``'s NVLink) and says so in ``source``; a one-device plan moves no bytes, so
those numbers do not enter its cost. FLOP/s and memory are measured as always.

**Output** (rank 0): the cluster file, by :func:`~autoddl.engine.cluster.write_cluster_file`
(intra_node = the fit of ``intra``, inter_node = that of ``inter``, or ``intra`` on one node;
peak_flops = the measured rate), and ``<stem>.calibration.csv`` beside it (columns axis, kind,
bytes = T, p, seconds, predicted_seconds), each written to a temporary file in the same folder
and moved into place (never half a file).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from autoddl.engine.cluster import Cluster, Link, parse_cluster, write_cluster_file
from autoddl.engine.placements import COLLECTIVES, collective_cost
from autoddl.errors import UserError
from autoddl.engine.plan import format_bytes
from autoddl.files import check_output, replaced_note, write_atomic
from autoddl.runtime.rank import exit_rank, run_rank

if TYPE_CHECKING:
    import torch


COMMAND = "autoddl calibrate"
DEFAULT_MIN_BYTES = 4 * 2**10
DEFAULT_MAX_BYTES = 16 * 2**20
DEFAULT_POINTS = 7
DEFAULT_REPS = 5
_ELEMENT = 4  # bytes of a float32, the collectives' element
_MATMUL_N = {"cpu": 1024, "cuda": 8192}
_MATMUL_REPS = 5


@dataclass(frozen=True)
class Sample:
    """One timed collective: ``seconds`` for ``kind`` on an axis of size ``p``, each device
    holding ``held_bytes`` before it."""

    axis: str
    kind: str
    p: int
    held_bytes: int
    seconds: float


@dataclass(frozen=True)
class LinkFit:
    """α (``latency_s``) and β (``bandwidth_gbps``) of one axis, and the fit's RMS relative
    residual over its ``samples`` timings."""

    latency_s: float
    bandwidth_gbps: float
    residual: float
    samples: int

    def seconds(self, kind: str, p: int, held_bytes: float) -> float:
        """The model's time of one collective (the module docstring's t = s·α + b/β)."""
        sent, steps = collective_cost(kind, p, held_bytes)
        return steps * self.latency_s + sent / (self.bandwidth_gbps * 1e9)

    @property
    def link(self) -> Link:
        return Link(self.bandwidth_gbps, self.latency_s)


def fit_link(samples: Sequence[Sample]) -> LinkFit:
    """Fit α ≥ 0 and β > 0 to ``samples`` by least squares on the relative error (the module
    docstring's **Fit**)."""
    if not samples:
        raise ValueError("no samples to fit")
    rows = [collective_cost(s.kind, s.p, s.held_bytes) for s in samples]
    a = np.array([[steps, sent] for sent, steps in rows], dtype=float)  # columns: α, 1/β
    t = np.array([s.seconds for s in samples], dtype=float)
    if not np.all(np.isfinite(t) & (t > 0)):
        raise ValueError("timings must be positive and finite")
    m = a / t[:, None]  # rows a_i/t_i, fitted against 1

    def rel_err(x: np.ndarray) -> float:
        return float(np.sqrt(np.mean((m @ x - 1.0) ** 2)))

    norms = np.linalg.norm(m, axis=0)
    norms[norms == 0] = 1.0
    x = np.linalg.lstsq(m / norms, np.ones(len(t)), rcond=None)[0] / norms
    if np.any(x < 0):  # the optimum with x >= 0 lies on the boundary: one unknown at 0
        alone = [np.zeros(2), np.zeros(2)]
        for j in (0, 1):
            alone[j][j] = max(0.0, m[:, j].sum() / (m[:, j] @ m[:, j] or 1.0))
        x = min(alone, key=rel_err)
    if x[1] <= 0:  # infinite bandwidth is no link: the best rate seen, then α again
        x[1] = 1.0 / float(np.max(a[:, 1] / t))
        rest = 1.0 - m[:, 1] * x[1]
        x[0] = max(0.0, float(m[:, 0] @ rest) / float(m[:, 0] @ m[:, 0]))
    return LinkFit(float(x[0]), 1.0 / (float(x[1]) * 1e9), rel_err(x), len(samples))


def size_list(min_bytes: int, max_bytes: int, points: int) -> list[int]:
    """``points`` sizes in bytes, geometric from ``min_bytes`` to ``max_bytes``, each a whole
    number of float32 elements (duplicates dropped)."""
    raw = np.geomspace(min_bytes, max_bytes, points)
    return sorted({max(_ELEMENT, int(round(b / _ELEMENT)) * _ELEMENT) for b in raw})


def check_options(output: str | None, nproc: int, min_bytes: int, max_bytes: int, points: int,
                  reps: int) -> None:
    """Raise :class:`UserError` naming the problem and the fix for bad calibrate options
    (``output`` None: the path is not checked)."""
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if output is not None:
        if Path(output).suffix.lower() != ".toml":
            raise UserError(f"--output {output!r}: calibrate writes TOML; name the file *.toml")
        check_output(output, "--output")
        check_output(csv_path(output), "--output (its calibration table)", [output])
    if min_bytes < _ELEMENT:
        raise UserError(f"--min-bytes must be at least {_ELEMENT} (one float32), got {min_bytes}")
    if max_bytes < min_bytes:
        raise UserError(f"--max-bytes {max_bytes} is below --min-bytes {min_bytes}; swap them")
    if points < 2:
        raise UserError(f"--points must be at least 2 (sizes to fit a line through), got {points}")
    if reps < 1:
        raise UserError(f"--reps must be at least 1, got {reps}")


def _collective(kind: str, x: torch.Tensor, p: int, group) -> Callable[[], object]:
    """A call of collective ``kind`` on ``x`` (the local piece) over ``group`` of size ``p``."""
    import torch
    import torch.distributed as dist

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    if kind == "all_reduce":
        return lambda: dist.all_reduce(x, group=group)
    if kind == "all_gather":
        out = x.new_empty(x.numel() * p)
        return lambda: gather(out, x, group=group)
    if kind == "reduce_scatter":
        out = x.new_empty(x.numel() // p)
        return lambda: scatter(out, x, group=group)
    assert kind == "all_to_all", kind
    out = torch.empty_like(x)
    return lambda: dist.all_to_all_single(out, x, group=group)


def _median_seconds(fn: Callable[[], object], reps: int, device: torch.device,
                    group=None) -> float:
    """Median wall time of ``fn`` over ``reps`` runs after one warm-up, each started after a
    barrier on ``group`` (when given)."""
    import torch
    import torch.distributed as dist

    cuda = device.type == "cuda"
    fn()
    times = []
    for _ in range(reps):
        if group is not None:
            dist.barrier(group=group)
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_links(axes: dict[str, tuple[int, object]], sizes: Sequence[int], reps: int,
                  device: torch.device) -> list[Sample]:
    """Time every collective kind at every size on every axis ``name -> (p, group)`` of size
    > 1; the median per rank, then the maximum over all ranks."""
    import torch
    import torch.distributed as dist

    plan = []
    for name, (p, group) in axes.items():
        for nbytes in sizes:
            numel = max(p, round(nbytes / _ELEMENT / p) * p)
            x = torch.ones(numel, dtype=torch.float32, device=device)
            for kind in COLLECTIVES:
                secs = _median_seconds(_collective(kind, x, p, group), reps, device, group)
                plan.append((name, kind, p, numel * _ELEMENT, secs))
    if not plan:
        return []
    worst = torch.tensor([s for *_, s in plan], dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return [Sample(n, k, p, b, float(s)) for (n, k, p, b, _), s in zip(plan, worst.tolist())]


def measure_flops(device: torch.device, n: int | None = None) -> float:
    """FLOP/s of an n×n matmul (float32 on CPU, bf16 on CUDA), median of a few runs."""
    import torch

    n = n or _MATMUL_N[device.type]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, dtype=dtype, device=device, generator=gen)
    b = torch.randn(n, n, dtype=dtype, device=device, generator=gen)
    return 2.0 * n**3 / _median_seconds(lambda: a @ b, _MATMUL_REPS, device)


def memory_per_device(device: torch.device, local_world: int) -> int:
    """Bytes of memory per device: the GPU's total, or this node's RAM over its ranks."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:  # a container's limit (cgroup v2), where lower
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return max(1, total // local_world)


def csv_path(output: str | os.PathLike[str]) -> Path:
    """``<stem>.calibration.csv`` beside the cluster file ``output``."""
    path = Path(output)
    return path.with_name(f"{path.stem}.calibration.csv")


def build_cluster(name: str, nodes: int, per_node: int, fits: dict[str, LinkFit],
                  peak_flops: float, memory_bytes: int, device_type: str,
                  source: str) -> Cluster:
    """The cluster of the fitted axes: intra_node = ``fits["intra"]``, inter_node =
    ``fits["inter"]``; an axis not measured takes the other's link, or with neither the
    nominal link of the device type's preset (see the module docstring)."""
    preset = "dgx-h100" if device_type == "cuda" else "cpu"
    measured = [fits[a].link for a in ("intra", "inter") if a in fits]
    intra = fits["intra"].link if "intra" in fits else \
        measured[0] if measured else parse_cluster(preset).intra_node
    inter = fits["inter"].link if "inter" in fits else intra
    return Cluster(name=name, nodes=nodes, devices_per_node=per_node, intra_node=intra,
                   inter_node=inter, memory_per_device_bytes=int(memory_bytes),
                   peak_flops=float(peak_flops), device_type=device_type, source=source)


def write_results(output: str, cluster: Cluster, samples: Sequence[Sample],
                  fits: dict[str, LinkFit]) -> Path:
    """Write the cluster file and its CSV of timings beside it, each atomically; returns the
    CSV's path."""
    out = Path(output)
    table = csv_path(out)

    def rows(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["axis", "kind", "bytes", "p", "seconds", "predicted_seconds"])
            for s in samples:
                pred = fits[s.axis].seconds(s.kind, s.p, s.held_bytes)
                w.writerow([s.axis, s.kind, s.held_bytes, s.p, repr(s.seconds), repr(pred)])

    try:
        write_atomic(table, rows)
        write_atomic(out, lambda tmp: write_cluster_file(cluster, tmp))
    except OSError as e:
        raise UserError(f"cannot write {str(out)!r} ({e.strerror}); check the folder is "
                        "writable") from None
    return table


#: what the summary's residual column means, printed under it
RESIDUAL_WORDS = (
    "residual: root-mean-square relative difference between the measured times and the fitted "
    "line latency + bytes / bandwidth (0 %: every timing on the line; a few % is a clean "
    "link; tens of % means noisy timings, e.g. a loaded machine: the fit still gives the "
    "typical cost, and a rerun on an idle machine or with more --reps tightens it)")


def summary(cluster: Cluster, fits: dict[str, LinkFit], sizes: dict[str, int]) -> str:
    """A short table of the fitted links, then compute rate and memory per device."""
    lines = [f"{'axis':<8}{'size':>5}{'bandwidth GB/s':>16}{'latency µs':>12}{'residual':>10}"
             f"{'timings':>9}"]
    for name, fit in fits.items():
        lines.append(f"{name:<8}{sizes[name]:>5}{fit.bandwidth_gbps:>16.3f}"
                     f"{fit.latency_s * 1e6:>12.2f}{fit.residual:>9.1%}{fit.samples:>9}")
    if not fits:
        lines.append("(no axis of size > 1: links nominal, see the file's source)")
    else:
        lines.append(RESIDUAL_WORDS)
    lines.append(f"compute {cluster.peak_flops / 1e9:.1f} GFLOP/s per device "
                 f"({'bf16' if cluster.device_type == 'cuda' else 'float32'} matmul), "
                 f"memory {format_bytes(cluster.memory_per_device_bytes)} per device")
    return "\n".join(lines)


def calibrate_rank(output: str, min_bytes: int, max_bytes: int, points: int, reps: int) -> int:
    """One rank: measure, fit, and (rank 0) write the files and print the summary."""
    import torch
    import torch.distributed as dist

    from autoddl.runtime.rank import group_timeout_s, pick_device

    t_start = time.perf_counter()
    first = os.environ.get("RANK", "0") == "0"  # only rank 0 writes: only it checks the path
    check_options(output if first else None, 1, min_bytes, max_bytes, points, reps)
    note = replaced_note(output) if first else ""
    backend, device = pick_device()
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=group_timeout_s()))
    rank, world = dist.get_rank(), dist.get_world_size()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world % per_node:
        raise UserError(f"{world} ranks do not fill nodes of {per_node}; start the same number "
                        "of processes on every node")
    nodes = world // per_node
    axes: dict[str, tuple[int, object]] = {}
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (nodes, per_node), mesh_dim_names=("inter", "intra"))
        axes = {name: (size, mesh.get_group(name)) for name, size
                in (("intra", per_node), ("inter", nodes)) if size > 1}
    samples = measure_links(axes, size_list(min_bytes, max_bytes, points), reps, device)
    dist.barrier()
    rate = torch.tensor([measure_flops(device)], dtype=torch.float64, device=device)
    memory = torch.tensor([float(memory_per_device(device, per_node))], dtype=torch.float64,
                          device=device)
    dist.all_reduce(rate, op=dist.ReduceOp.MIN)
    dist.all_reduce(memory, op=dist.ReduceOp.MIN)
    dist.barrier()  # every rank is done with collectives: rank 0 writes, the others leave
    if rank != 0:
        return 0
    fits = {name: fit_link([s for s in samples if s.axis == name]) for name in axes}
    date = datetime.date.today().isoformat()
    procs = f"{world} process{'es' if world > 1 else ''} ({nodes} node(s) x {per_node})"
    source = f"calibrated {date} on {backend}, {procs}; "
    source += (", ".join(f"{n}: {f.samples} timings, {f.residual:.1%} RMS relative residual"
                         for n, f in fits.items()) if fits
               else "links nominal (one process per node: no link to measure)")
    cluster = build_cluster(Path(output).stem or "calibrated", nodes, per_node, fits,
                            float(rate.item()), int(memory.item()), device.type, source)
    table = write_results(output, cluster, samples, fits)
    print(f"calibrated {procs}, {backend} on {device.type}, measured in "
          f"{time.perf_counter() - t_start:.1f} s", flush=True)
    print(summary(cluster, fits, {n: p for n, (p, _) in axes.items()}))
    print(f"cluster file written to {output}{note}; timings and fit in {table}", flush=True)
    return 0


def launch(output: str, nproc: int = 2, min_bytes: int = DEFAULT_MIN_BYTES,
           max_bytes: int = DEFAULT_MAX_BYTES, points: int = DEFAULT_POINTS,
           reps: int = DEFAULT_REPS) -> int:
    """``autoddl calibrate``: check the options, run ``nproc`` local ranks with torchrun;
    returns the job's exit code (rank failures reported as by ``autoddl run``)."""
    from autoddl.runtime.launch import run_ranks

    check_options(output, nproc, min_bytes, max_bytes, points, reps)
    args = ["-o", str(Path(output).resolve()), "--min-bytes", str(min_bytes),
            "--max-bytes", str(max_bytes), "--points", str(points), "--reps", str(reps)]
    return run_ranks(__name__, nproc, args, COMMAND)


def main(argv: list[str] | None = None) -> int:
    """Entry point of one rank (``python -m autoddl.runtime.calibrate`` under torchrun)."""
    ap = argparse.ArgumentParser(prog="autoddl.runtime.calibrate")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--min-bytes", type=int, default=DEFAULT_MIN_BYTES)
    ap.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES)
    ap.add_argument("--points", type=int, default=DEFAULT_POINTS)
    ap.add_argument("--reps", type=int, default=DEFAULT_REPS)
    a = ap.parse_args(argv)
    return run_rank(COMMAND, lambda: calibrate_rank(a.output, a.min_bytes, a.max_bytes,
                                                    a.points, a.reps))


if __name__ == "__main__":
    exit_rank(main())
