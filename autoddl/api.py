"""autoddl as a library: plan a model object from Python, as ``autoddl plan`` plans a spec.

    import autoddl
    plan = autoddl.plan(model, (tokens, targets), "dgx-a100:nodes=2")
    plan.save("plan.json")            # or autoddl.engine.plan.save_plan

``model(*example_inputs)`` must return the training loss (a scalar), as for ``--model
file.py:factory``. The model is captured with ``torch.export`` on its own device (weights are
not copied; a model on the ``meta`` device plans without memory), and planned with the command
line's defaults: recomputation decided per layer, every pipeline degree a candidate, the
cluster's default precision, solved to the default gap. Keyword options mirror the command's
flags (``stages=1`` is ``--stages 1``).
"""

from __future__ import annotations

from typing import Any, Callable

from autoddl.errors import UserError


def _cluster(cluster: Any):
    from autoddl.engine.cluster import Cluster
    from autoddl.engine.cluster_files import parse_cluster

    if isinstance(cluster, Cluster):
        return cluster
    if isinstance(cluster, str):
        return parse_cluster(cluster)
    raise UserError(f"cluster must be a spec such as 'cpu:devices=4', a cluster file or a "
                    f"Cluster, got {type(cluster).__name__}")


def plan(model: Any, example_inputs: tuple, cluster: Any, *, optimizer: str = "adam",
         recompute: str = "auto", precision: str | None = None, stages: int | None = None,
         microbatches: int | None = None, interleave: int | None = None,
         schedule: str = "1F1B", objective: str | None = None, gap: float = 1e-6,
         time_limit_s: float | None = None, backend: str | None = None,
         balance_eps: float = 0.1, workers: int | None = None, strict_rules: bool = False,
         name: str | None = None, log: Callable[[str], None] | None = None):
    """The optimal :class:`~autoddl.engine.plan.Plan` of ``model`` (whose forward on
    ``example_inputs``, one global batch, returns the loss) on ``cluster`` (a spec string, a
    cluster file's path or a :class:`~autoddl.engine.cluster.Cluster`); options as the
    ``autoddl plan`` flags of the same names. ``name`` labels the model in the plan (default:
    its class name). Raises :class:`~autoddl.errors.UserError` on bad input."""
    import torch

    from autoddl.engine.capture import capture, default_microbatches, microbatch_inputs
    from autoddl.engine.costs import TrainingConfig
    from autoddl.engine.guard import user_code
    from autoddl.engine.planner import plan_graph
    from autoddl.engine.precision import resolve_precision
    from autoddl.specs import DEFAULT_OBJECTIVE, check_objective

    if not isinstance(model, torch.nn.Module):
        raise UserError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise UserError("example_inputs must be a non-empty tuple of the forward's arguments "
                        "(one global batch)")
    if stages is not None and stages < 1:
        raise UserError(f"stages must be at least 1, got {stages}")
    c = _cluster(cluster)
    objective = check_objective(objective or DEFAULT_OBJECTIVE)
    config = TrainingConfig(optimizer, recompute, resolve_precision(precision, c.device_type))
    label = name or type(model).__name__
    inputs = tuple(example_inputs)
    with user_code(f"model {label}", foreign=True):
        graph = capture(model, inputs)
        m = microbatches or default_microbatches(inputs)
        mb_graph = (capture(model, microbatch_inputs(inputs, m))
                    if stages != 1 and c.num_devices > 1 and m > 1 else None)
    return plan_graph(graph, c, model_spec=f"python:{label}", backend=backend,
                      time_limit_s=time_limit_s, config=config, mip_rel_gap=gap,
                      microbatch_graph=mb_graph, microbatches=m, stages=stages,
                      balance_eps=balance_eps, schedule=schedule, log=log, workers=workers,
                      strict_rules=strict_rules, interleave=interleave, objective=objective)
