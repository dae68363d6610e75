"""One rank of ``autoddl run``: build the mesh, shard as planned, train, optionally check.

Launched by torchrun (``python -m torch.distributed.run ... -m autoddl.runtime.worker``). The
backend follows the device: NCCL with one GPU per rank when CUDA is there, gloo on CPUs; nothing
else differs between the two paths.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from autoddl.engine.capture import export, graph_from_export
from autoddl.engine.costs import OPTIMIZER_STATES
from autoddl.engine.models import build_model, parse_model_spec
from autoddl.engine.plan import Plan, load_plan
from autoddl.errors import UserError
from autoddl.runtime.execute import ShardedExecutor

_FUNCOL_KIND = {
    "all_reduce": "all_reduce", "all_gather_into_tensor": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter", "all_to_all_single": "all_to_all",
    "all_reduce_": "all_reduce", "allreduce_": "all_reduce", "_allgather_base_": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter", "alltoall_base_": "all_to_all",
}


def pick_device() -> tuple[str, torch.device]:
    """(backend, device) for this rank: NCCL on its own GPU when there is one GPU per local
    rank, else gloo on CPU. ``AUTODDL_DEVICE=cpu`` forces the CPU path."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    forced_cpu = os.environ.get("AUTODDL_DEVICE", "") == "cpu"
    if not forced_cpu and torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        torch.cuda.set_device(local)
        return "nccl", torch.device("cuda", local)
    return "gloo", torch.device("cpu")


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """The optimizer the plan's memory model assumed."""
    assert name in OPTIMIZER_STATES
    if name in ("adam", "adamw"):
        return torch.optim.AdamW(params, lr=lr, foreach=False)
    return torch.optim.SGD(params, lr=lr, momentum=0.9 if name == "momentum" else 0.0,
                           foreach=False)


def relative_errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict:
    """||got − ref|| / ||ref|| per tensor, the denominator floored at 1e-3 of the norm of all of
    ``ref`` together (a tensor whose true value is ~0, such as the key bias's gradient under
    softmax, is compared at the scale of the whole set, not at its own rounding noise)."""
    total = torch.sqrt(sum((r.double() ** 2).sum() for r in ref.values()))
    floor = max(float(total) * 1e-3, 1e-30)
    return {k: float((got[k].double() - r.double()).norm()) / max(float(r.double().norm()), floor)
            for k, r in ref.items()}


def predicted_counts(plan: Plan) -> Counter:
    """Collective counts per kind the plan predicts for one step."""
    return Counter({k: int(v["count"]) for k, v in plan.cost["per_kind"].items()})


def run(plan: Plan, steps: int, check: bool, lr: float, tol: float) -> int:
    """Train ``steps`` steps of the planned model; with ``check``, compare to one process."""
    backend, device = pick_device()
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != plan.num_devices:
        raise UserError(f"plan needs {plan.num_devices} processes, torchrun gave {world}")
    mesh = init_device_mesh(device.type, plan.mesh_shape, mesh_dim_names=tuple(plan.axis_names))
    if rank == 0:
        print(f"{world} rank(s), backend {backend} on {device.type}, mesh "
              f"{dict(zip(plan.axis_names, plan.mesh_shape))}, torch {torch.__version__}",
              flush=True)
    spec = parse_model_spec(plan.model["spec"])
    model, inputs = build_model(spec, device, seed=0)
    ep = export(model, inputs)
    graph = graph_from_export(ep)
    if graph.digest() != plan.model["graph_hash"]:
        raise UserError("plan was made for a different graph of this model (graph hash "
                        "differs); re-run `autoddl plan` with this autoddl and torch")
    full_params = dict(model.named_parameters())
    ex = ShardedExecutor(ep, graph, plan, mesh, full_params)
    names = [n.name for n in graph.nodes if n.kind == "input"]
    feed = dict(zip(names, inputs))
    opt = make_optimizer(plan.training["optimizer"], list(ex.params.values()), lr)
    ref_opt = make_optimizer(plan.training["optimizer"], list(model.parameters()), lr)
    worst = 0.0
    ok = True
    from torch.distributed.tensor.debug import CommDebugMode
    for step in range(steps):
        opt.zero_grad()
        ex.log.entries.clear()
        with CommDebugMode() as comm:
            _, loss = ex.forward(feed)
            loss.backward()
        counts = comm.get_comm_counts()
        value = float(loss.detach())
        msg = f"step {step}: loss {value:.6f}"
        if check:
            ref_opt.zero_grad()
            ref_loss = model(*inputs)
            ref_loss.backward()
            grads = ex.full_grads()
            ref_value = float(ref_loss.detach())
            errs = {"loss": abs(value - ref_value) / max(abs(ref_value), 1e-30)}
            errs.update(relative_errors(grads, {k: p.grad for k, p in model.named_parameters()}))
            step_worst = max(errs.values())
            worst = max(worst, step_worst)
            bad = {k: v for k, v in errs.items() if v > tol}
            msg += f"  reference {ref_value:.6f}  max relative error {step_worst:.2e}"
            if bad:
                ok = False
                msg += "  MISMATCH: " + ", ".join(f"{k} {v:.2e}" for k, v in list(bad.items())[:5])
            ref_opt.step()
        opt.step()
        if rank == 0:
            print(msg, flush=True)
        if step == 0 and rank == 0:
            _print_collectives(plan, ex, counts)
    if check:
        ref = {k: p.detach() for k, p in model.named_parameters()}
        weights = max(relative_errors(ex.full_params(), ref).values())
        if rank == 0:
            verdict = "PASSED" if ok else "FAILED"
            print(f"check {verdict}: {steps} step(s), worst relative error {worst:.2e} over loss "
                  f"and gradients (tolerance {tol:.0e}); weights after the last update differ by "
                  f"{weights:.2e}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


def _print_collectives(plan: Plan, ex: ShardedExecutor, counts) -> None:
    measured = Counter()
    for op, n in counts.items():
        name = str(op).split(".")[-1] if not hasattr(op, "__name__") else op.__name__
        name = name.split(".")[0]
        measured[_FUNCOL_KIND.get(name, name)] += n
    predicted = predicted_counts(plan)
    executed = ex.log.by_kind()
    print(f"{'collective':<16}{'predicted':>10}{'executed':>10}{'torch saw':>10}"
          f"{'pred. bytes':>14}{'exec. bytes':>14}")
    bytes_exec = Counter()
    for (_, _, kind), (_, b) in ex.log.entries.items():
        bytes_exec[kind] += b
    for kind in sorted(set(predicted) | set(executed) | set(measured)):
        pb = plan.cost["per_kind"].get(kind, {}).get("bytes", 0.0)
        print(f"{kind:<16}{predicted[kind]:>10}{executed[kind]:>10}{measured[kind]:>10}"
              f"{pb:>14.0f}{bytes_exec[kind]:>14.0f}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of one rank."""
    ap = argparse.ArgumentParser(prog="autoddl.runtime.worker")
    ap.add_argument("plan")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tol", type=float, default=1e-5)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    try:
        return run(load_plan(a.plan), a.steps, a.check, a.lr, a.tol)
    except UserError as exc:
        print(f"autoddl run: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
