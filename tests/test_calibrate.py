"""``autoddl calibrate``: the α-β fit, the cluster it builds, and the command end to end.

The fit must recover α and β exactly from timings the cost model's own formulas generate
(:func:`autoddl.engine.placements.collective_cost`), solve a hand-computed case, and keep α ≥ 0
and β finite and positive on timings no link explains. End to end, ``autoddl calibrate`` on 2
gloo processes (tiny sizes) writes a cluster file ``parse_cluster`` reads and ``autoddl plan``
solves on, with its CSV of timings; one process writes a valid file with nominal links; bad
options are one-line user errors. The CUDA case (one rank on NCCL) skips without a GPU.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from autoddl.engine.cluster import parse_cluster
from autoddl.engine.placements import COLLECTIVES, collective_cost
from autoddl.runtime.calibrate import (LinkFit, Sample, build_cluster, csv_path, fit_link,
                                       size_list)

TIMEOUT_S = 120
TINY = ["--min-bytes", "1024", "--max-bytes", "65536", "--points", "3", "--reps", "2"]
MODEL = "mlp:batch=16,dim_in=8,hidden=16,layers=1,dim_out=8"


def _synthetic(alpha: float, gbps: float, ps: tuple[int, ...],
               sizes: tuple[int, ...] = (4096, 65536, 1 << 20, 16 << 20)) -> list[Sample]:
    out = []
    for p in ps:
        for kind in COLLECTIVES:
            for t in sizes:
                sent, steps = collective_cost(kind, p, t)
                out.append(Sample("x", kind, p, t, steps * alpha + sent / (gbps * 1e9)))
    return out


# ---------------------------------------------------------------------------------------------
# The fit
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ps", [(2,), (3,), (4,), (8,), (2, 4, 8)])
@pytest.mark.parametrize("alpha,gbps", [(1e-5, 1.0), (5e-6, 300.0), (2e-4, 0.05)])
def test_fit_recovers_exact_alpha_and_bandwidth(ps, alpha, gbps):
    fit = fit_link(_synthetic(alpha, gbps, ps))
    assert fit.latency_s == pytest.approx(alpha, rel=1e-9)
    assert fit.bandwidth_gbps == pytest.approx(gbps, rel=1e-9)
    assert fit.residual < 1e-9
    assert fit.samples == 4 * 4 * len(ps)


def test_fit_hand_computed():
    # p = 2, α = 10 µs, β = 1 GB/s. All-reduce of T = 1 MB: 2(p-1)+1 = 3 steps, 2(p-1)/p·T =
    # 1 MB sent: 30 µs + 1 ms. All-gather of a 1 MB local piece: p = 2 steps, (p-1)·T = 1 MB:
    # 20 µs + 1 ms. Subtracting: α = 10 µs; then 1 MB/β = 1 ms.
    fit = fit_link([Sample("intra", "all_reduce", 2, 10**6, 1.03e-3),
                    Sample("intra", "all_gather", 2, 10**6, 1.02e-3)])
    assert fit.latency_s == pytest.approx(1e-5, rel=1e-9)
    assert fit.bandwidth_gbps == pytest.approx(1.0, rel=1e-9)
    assert LinkFit(1e-5, 1.0, 0.0, 0).seconds("all_reduce", 2, 10**6) == pytest.approx(1.03e-3)
    # reduce-scatter of T = 1 MB on p = 4: 4 steps, 3/4 MB sent: 40 µs + 0.75 ms
    assert fit.seconds("reduce_scatter", 4, 10**6) == pytest.approx(0.79e-3)


def test_fit_keeps_latency_nonnegative():
    # times that grow with bytes but start below zero at no bytes: a negative α fits best
    samples = [Sample("x", "all_reduce", 2, t, t / 1e9 - 1e-6) for t in (10**5, 10**6, 10**7)]
    fit = fit_link(samples)
    assert fit.latency_s == 0.0
    assert 0 < fit.bandwidth_gbps < float("inf")


def test_fit_keeps_bandwidth_finite():
    # times that shrink as the messages grow: no positive bandwidth explains them
    samples = [Sample("x", "all_gather", 4, t, s) for t, s in ((10**3, 3e-3), (10**6, 1e-3))]
    fit = fit_link(samples)
    assert fit.latency_s >= 0
    assert 0 < fit.bandwidth_gbps < float("inf")
    assert fit.residual > 0.1


def test_size_list():
    sizes = size_list(4096, 16 << 20, 7)
    assert sizes[0] == 4096 and sizes[-1] == 16 << 20 and len(sizes) == 7
    assert all(s % 4 == 0 for s in sizes)
    assert all(b / a == pytest.approx(4.0, rel=1e-3) for a, b in zip(sizes, sizes[1:]))


def test_build_cluster_links():
    intra, inter = LinkFit(1e-5, 100.0, 0.0, 4), LinkFit(2e-5, 10.0, 0.0, 4)
    c = build_cluster("c", 2, 4, {"intra": intra, "inter": inter}, 1e12, 10**9, "cuda", "s")
    assert (c.intra_node, c.inter_node) == (intra.link, inter.link)
    one_per_node = build_cluster("c", 2, 1, {"inter": inter}, 1e12, 10**9, "cpu", "s")
    assert one_per_node.intra_node == one_per_node.inter_node == inter.link
    alone = build_cluster("c", 1, 1, {}, 1e12, 10**9, "cpu", "s")
    assert alone.intra_node == parse_cluster("cpu").intra_node  # nominal


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def _cli(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autoddl.cli", *argv], cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def _describe(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout:\n{p.stdout}\n--- stderr:\n{p.stderr}"


ERRORS = {
    "folder-missing": (["-o", "no-such-dir/c.toml"], "folder 'no-such-dir' does not exist"),
    "nproc-zero": (["--nproc", "0", "-o", "c.toml"], "--nproc must be at least 1"),
    "not-toml": (["-o", "c.yaml"], "name the file *.toml"),
    "sizes-swapped": (["-o", "c.toml", "--min-bytes", "4096", "--max-bytes", "1024"],
                      "is below --min-bytes"),
    "one-point": (["-o", "c.toml", "--points", "1"], "--points must be at least 2"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors(tmp_path, case):
    argv, fragment = ERRORS[case]
    p = _cli(["calibrate", *argv], tmp_path)
    assert p.returncode == 2, _describe(p)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoddl: error: "), _describe(p)
    assert fragment in lines[0], _describe(p)
    assert not list(tmp_path.iterdir()), "a file was written"


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> dict:
    """Calibrate on 2 processes and on 1 (at once), then plan on the 2-process file."""
    tmp = tmp_path_factory.mktemp("calibrate")
    jobs = {"two": (["calibrate", "--nproc", "2", "-o", "tmp/cluster.toml", *TINY], {}),
            "one": (["calibrate", "--nproc", "1", "-o", "one.toml", *TINY],
                    {"AUTODDL_DEVICE": "cpu"})}
    (tmp / "tmp").mkdir()
    with ThreadPoolExecutor(2) as pool:
        futures = {k: pool.submit(_cli, argv, tmp, **env) for k, (argv, env) in jobs.items()}
        out = {k: f.result() for k, f in futures.items()}
    out["plan"] = _cli(["plan", "--model", MODEL, "--cluster", "tmp/cluster.toml",
                        "-o", "plan.json"], tmp)
    out["tmp"] = tmp
    return out


@pytest.mark.dist
def test_calibrate_two_processes(calibrated):
    p, tmp = calibrated["two"], calibrated["tmp"]
    assert p.returncode == 0, _describe(p)
    assert "intra" in p.stdout and "GFLOP/s" in p.stdout, p.stdout
    path = tmp / "tmp" / "cluster.toml"
    c = parse_cluster(str(path))
    assert (c.nodes, c.devices_per_node, c.device_type) == (1, 2, "cpu")
    assert c.intra_node == c.inter_node and c.intra_node.bandwidth_gbps > 0
    assert c.peak_flops > 1e8 and c.memory_per_device_bytes > 2**20
    assert "calibrated" in c.source and "gloo" in c.source and "2 processes" in c.source
    rows = list(csv.DictReader(csv_path(path).open()))
    assert len(rows) == 3 * len(COLLECTIVES)
    assert {r["axis"] for r in rows} == {"intra"} and {r["p"] for r in rows} == {"2"}
    assert {r["kind"] for r in rows} == set(COLLECTIVES)
    assert all(float(r["seconds"]) > 0 and float(r["predicted_seconds"]) > 0 for r in rows)
    assert not [f for f in (tmp / "tmp").iterdir() if f.name.startswith(".")], "temp file left"


@pytest.mark.dist
def test_plan_on_calibrated_cluster(calibrated):
    p = calibrated["plan"]
    assert p.returncode == 0, _describe(p)
    assert "optimal" in p.stdout, p.stdout
    assert (calibrated["tmp"] / "plan.json").is_file()


@pytest.mark.dist
def test_calibrate_one_process(calibrated):
    p, tmp = calibrated["one"], calibrated["tmp"]
    assert p.returncode == 0, _describe(p)
    c = parse_cluster(str(tmp / "one.toml"))
    assert (c.nodes, c.devices_per_node) == (1, 1)
    assert c.intra_node == parse_cluster("cpu").intra_node and "nominal" in c.source
    assert c.peak_flops > 1e8
    assert list(csv.DictReader(csv_path(tmp / "one.toml").open())) == []


@pytest.mark.cuda
def test_calibrate_one_gpu_nccl(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    p = _cli(["calibrate", "--nproc", "1", "-o", "gpu.toml", *TINY], tmp_path)
    assert p.returncode == 0, _describe(p)
    assert "nccl on cuda" in p.stdout, p.stdout
    c = parse_cluster(str(tmp_path / "gpu.toml"))
    assert c.device_type == "cuda" and "nccl" in c.source
    assert c.peak_flops > 1e12  # a bf16 matmul on any recent GPU
    assert c.memory_per_device_bytes == torch.cuda.get_device_properties(0).total_memory
