"""The ``autoddl`` command line: plan, compare, run, calibrate, show, demo, backends.

Every user error prints one line, ``autoddl: error: ...``, and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from autoddl import __version__
from autoddl.errors import Terminated, UserError, raise_on_sigterm


class Progress:
    """What long work says on stderr: with ``verbose``, one line per message; otherwise, on a
    terminal, one status line rewritten in place (capture, screening k/N, each ILP with the best
    plan and the global gap) and cleared at the end; otherwise nothing."""

    def __init__(self, verbose: bool, stream=None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.verbose = verbose
        self.live = not verbose and bool(getattr(self.stream, "isatty", lambda: False)())
        self.shown = False

    def __call__(self, msg: str) -> None:
        """Report ``msg``."""
        if self.verbose:
            print(f"  {msg}", file=self.stream, flush=True)
        elif self.live:
            self.stream.write(f"\r\x1b[K{msg[:120]}")
            self.stream.flush()
            self.shown = True

    def done(self) -> None:
        """Clear the status line, if one is shown."""
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def _check_planning(a: argparse.Namespace) -> None:
    """Every planning option checked before anything slow is imported (torch alone takes
    seconds on a loaded machine): a typo in ``--model``, ``--cluster`` or a number is
    reported at once. Sets ``a.objective`` to its checked value."""
    from autoddl.engine.cluster_files import parse_cluster
    from autoddl.formulations.backends import get_backend
    from autoddl.model_specs import parse_model_spec
    from autoddl.specs import DEFAULT_OBJECTIVE, check_objective

    parse_model_spec(a.model)
    parse_cluster(a.cluster)
    get_backend(a.backend)
    if a.time_limit is not None and a.time_limit <= 0:
        raise UserError(f"--time-limit must be positive, got {a.time_limit}")
    if not 0 <= getattr(a, "gap", 0.0) < 1:
        raise UserError(f"--gap must be in [0, 1), got {a.gap}")
    if getattr(a, "workers", None) is not None and a.workers < 1:
        raise UserError(f"--workers must be at least 1, got {a.workers}")
    for option in ("stages", "microbatches", "interleave"):
        value = getattr(a, option, None)
        if value is not None and value < 1:
            raise UserError(f"--{option} must be at least 1, got {value}")
    a.objective = check_objective(getattr(a, "objective", None) or DEFAULT_OBJECTIVE)


def _workload(a: argparse.Namespace):
    """The model and cluster of ``--model``/``--cluster`` and the training options, captured
    (the options checked before: :func:`_check_planning`)."""
    from autoddl.engine.cluster_files import parse_cluster
    from autoddl.engine.workload import load_workload

    return load_workload(a.model, parse_cluster(a.cluster), optimizer=a.optimizer,
                         recompute=a.recompute, microbatches=a.microbatches, stages=a.stages,
                         balance_eps=a.balance_eps, precision=a.precision)


def _inputs(a: argparse.Namespace) -> list[str]:
    """The files a planning command reads (its model file, its cluster file): never outputs."""
    return [a.model.partition(":")[0], a.cluster]


def _plan(a: argparse.Namespace) -> int:
    from autoddl.files import check_output, replaced_note

    t0 = time.perf_counter()
    _check_planning(a)
    a.output = str(check_output(a.output, "-o", _inputs(a)))  # before the work, not after
    note = replaced_note(a.output)
    from autoddl.engine.plan import save_plan, summary

    progress = Progress(a.verbose)
    progress(f"capturing {a.model}")
    try:
        work = _workload(a)
        capture_s = time.perf_counter() - t0
        cached = " (from the capture cache)" if work.from_cache else ""
        progress(f"captured {len(work.graph.ops)} ops in {capture_s:.2f} s{cached}; planning")
        plan = _solve(a, work, progress)
    finally:
        progress.done()
    save_plan(plan, a.output)
    print(summary(plan))
    print(f"\ncapture {capture_s:.2f} s, total {time.perf_counter() - t0:.2f} s; "
          f"plan written to {a.output}{note}")
    return 0


def _solve(a: argparse.Namespace, work, log: Progress):
    """The plan of a captured workload, under the command's options."""
    from autoddl.engine.planner import plan_graph

    return plan_graph(work.graph, work.cluster, model_spec=work.spec_text, backend=a.backend,
                      time_limit_s=a.time_limit, config=work.config, log=log,
                      microbatch_graph=work.microbatch_graph, microbatches=work.microbatches,
                      stages=a.stages, balance_eps=a.balance_eps, schedule=a.schedule,
                      layers=work.layers, mip_rel_gap=a.gap, workers=a.workers,
                      strict_rules=getattr(a, "strict_rules", False),
                      interleave=getattr(a, "interleave", None), objective=a.objective)


def _run(a: argparse.Namespace) -> int:
    from autoddl.runtime.launch import launch

    return launch(a.plan, a.nproc, steps=a.steps, check=a.check, lr=a.lr, tol=a.tol,
                  save=a.save, resume=a.resume, precision=a.precision)


def _calibrate(a: argparse.Namespace) -> int:
    from autoddl.runtime.calibrate import launch

    return launch(a.output, a.nproc, min_bytes=a.min_bytes, max_bytes=a.max_bytes,
                  points=a.points, reps=a.reps)


def _show(a: argparse.Namespace) -> int:
    from autoddl.engine.plan import load_plan, summary
    from autoddl.engine.show import layer_table, plot_plan
    from autoddl.files import check_output, replaced_note

    if a.plot is not None:
        a.plot = str(check_output(a.plot, "--plot", [a.plan]))
        note = replaced_note(a.plot)
    plan = load_plan(a.plan)
    print(summary(plan))
    print()
    print(layer_table(plan, params=a.all))
    if a.plot:
        plot_plan(plan, a.plot)
        print(f"\nplot written to {a.plot}{note}")
    return 0


def _compare(a: argparse.Namespace) -> int:
    from autoddl.files import check_output, replaced_note, write_text_atomic

    t0 = time.perf_counter()
    _check_planning(a)
    notes = {}
    if a.json is not None:
        a.json = str(check_output(a.json, "--json", _inputs(a)))
        notes["json"] = replaced_note(a.json)
    if a.plot is not None:
        a.plot = str(check_output(a.plot, "--plot", _inputs(a)))
        notes["plot"] = replaced_note(a.plot)
        if a.plot == a.json:
            raise UserError(f"--plot and --json both name {a.plot!r}; give two files")
    from autoddl.engine.compare import compare, plot, table, to_json

    if a.plot:
        from autoddl.engine.compare import pyplot
        pyplot()  # a missing matplotlib fails before the search, not after
    work = _workload(a)
    log = (lambda msg: print(f"  {msg}", file=sys.stderr)) if a.verbose else None
    rows, _ = compare(work, a.backend, a.time_limit, log, a.objective)
    title = f"{work.spec_text} on {work.cluster.spec or work.cluster.name}"
    minimized = ("; the ILP rows minimize the bytes each device sends"
                 if a.objective == "bytes" else "")
    print(f"{title} ({work.cluster.num_devices} devices, {work.config.precision}); cost = "
          "predicted step time (compute, the communication it waits for, pipeline "
          f"bubble), under one cost model{minimized}\n")
    print(table(rows))
    if a.json:
        write_text_atomic(a.json, to_json(rows, {"model": work.spec_text,
                                                 "cluster": work.cluster.spec}) + "\n")
        print(f"\nrows written to {a.json}{notes['json']}")
    if a.plot:
        plot(rows, a.plot, title)
        print(f"plot written to {a.plot}{notes['plot']}")
    print(f"total {time.perf_counter() - t0:.2f} s")
    return 0


def _demo(a: argparse.Namespace) -> int:
    """Plan the built-in GPT on 4 CPU devices, then run the plan with a numerical check."""
    ns = argparse.Namespace(model=a.model, cluster=a.cluster, output=a.output, backend=None,
                            time_limit=None, optimizer="adam", verbose=False, stages=None,
                            microbatches=None, schedule="1F1B", balance_eps=0.1,
                            recompute="none", gap=1e-6, workers=None, precision=None)
    print(f"== autoddl plan --model {a.model} --cluster {a.cluster} -o {a.output}\n")
    _plan(ns)
    print(f"\n== autoddl run {a.output} --steps {a.steps} --check\n", flush=True)
    rc = _run(argparse.Namespace(plan=a.output, nproc=None, steps=a.steps, check=True,
                                 lr=1e-3, tol=None, save=None, resume=None, precision=None))
    return rc


def _backends(a: argparse.Namespace) -> int:
    """List the solver backends, whether each is installed, and what runs without --backend."""
    import textwrap

    from autoddl.formulations.backends import BACKENDS, default_backend, default_search

    last = default_backend()
    for name, b in BACKENDS.items():
        mark = " (the default search's MILP solver)" if name == last else ""
        print(f"{name:<16}{'available' if b.available() else 'not installed'}{mark}")
    print()
    print(textwrap.fill(default_search() + ".", width=96))
    return 0


def _planning_options(p: argparse.ArgumentParser) -> None:
    """The options ``plan`` and ``compare`` share."""
    p.add_argument("--model", required=True,
                   help="e.g. gpt:layers=2,hidden=64, mlp, hf-gpt2, tv-resnet50 or file.py:factory")
    p.add_argument("--cluster", required=True, help="cpu:devices=4, dgx-a100:nodes=2 or a file")
    p.add_argument("--strict-rules", action="store_true",
                   help="fail on an operator without a sharding rule instead of running it "
                        "replicated (listed in the plan)")
    p.add_argument("--backend", default=None,
                   help="ILP solver backend (see `autoddl backends`); default: each ILP "
                        "first as a plain linear program on highs, then autoddl's branch and "
                        "bound on highs, then ortools-cbc (highs above 5,000 variables or "
                        "where the step has a slowest-stage or exposed-communication term) "
                        "where it gives up; a named backend solves every ILP "
                        "itself, after the linear program")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds for the whole search; the best plan found is returned with "
                        "its proven gap")
    p.add_argument("--gap", type=float, default=1e-6,
                   help="relative optimality gap at which the search stops (default 1e-6; "
                        "e.g. 0.001 for 0.1 %%)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes screening candidates (default: the CPUs available)")
    p.add_argument("--optimizer", default="adam", help="adam, adamw, momentum or sgd")
    p.add_argument("--microbatches", type=int, default=None,
                   help="micro-batches per step when pipelined (default: the largest divisor "
                        "of the batch up to 16)")
    p.add_argument("--recompute", default="auto", choices=RECOMPUTE_CHOICES,
                   help="auto (default): the solver chooses per layer among none, selective "
                        "and full; forced for every repeated layer: layers (keep only each "
                        "layer's inputs and recompute it in backward, Megatron's full "
                        "recomputation), selective (recompute attention's scores, Korthikanti "
                        "et al. 2022) or none")
    p.add_argument("--precision", default=None, choices=PRECISION_CHOICES,
                   help="bf16: activations, weights as used and gradients in 2 bytes, fp32 "
                        "master weights and optimizer states (16 B per parameter with Adam); "
                        "default: bf16 on a cuda cluster, fp32 on cpu")
    p.add_argument("--objective", default=None,
                   help="what the ILP minimizes: step (default), the predicted step time; "
                        "bytes, the bytes each device sends per step (AutoDDL's bandwidth "
                        "cost; a pipeline's busiest stage), every operator's work divided")
    p.add_argument("--balance-eps", type=float, default=0.1,
                   help="each pipeline stage's FLOPs at most (1+eps) x the mean (default 0.1)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print each progress message on its own line (stderr)")


#: the values of ``--precision`` (:data:`autoddl.engine.precision.PRECISIONS`; listed here so
#: that building the parser imports nothing)
PRECISION_CHOICES = ("fp32", "bf16")
#: the values of ``--recompute`` (:data:`autoddl.engine.costs.RECOMPUTE`)
RECOMPUTE_CHOICES = ("auto", "none", "selective", "layers")
#: the help of ``-o`` where it writes a plan
OUTPUT_HELP = ("plan file to write (default: plan.json in the current folder); an existing "
               "file is replaced, and the output says so")
DEMO_MODEL = "gpt:layers=2,hidden=256,heads=8,seq=64,batch=16,vocab=512"
#: what ``autoddl --help`` says first
DESCRIPTION = ("autoddl: plan how to parallelize a PyTorch model's training over a cluster "
               "(solved as an integer linear program, with its proof) and run the plan with "
               "torch.distributed")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``autoddl`` command."""
    ap = argparse.ArgumentParser(prog="autoddl", description=DESCRIPTION)
    ap.add_argument("--version", action="version", version=f"autoddl {__version__}",
                    help="print autoddl's version and exit")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="solve the optimal plan of a model on a cluster")
    _planning_options(p)
    p.add_argument("-o", "--output", default="plan.json", metavar="FILE.json",
                   help=OUTPUT_HELP)
    p.add_argument("--stages", type=int, default=None,
                   help="pipeline stages (default: the best of all; 1: no pipelining)")
    p.add_argument("--schedule", default="1F1B", help="pipeline schedule: 1F1B or GPipe")
    p.add_argument("--interleave", type=int, default=None, metavar="V",
                   help="force V model chunks per pipeline device (interleaved 1F1B; 1: none; "
                        "default: the planner chooses)")
    p.set_defaults(fn=_plan)

    c = sub.add_parser("compare", help="the optimal plan beside data parallel, ZeRO, Megatron, "
                                       "PTD-P, coordinate descent, Alpa-style and greedy plans")
    _planning_options(c)
    c.add_argument("--json", default=None, metavar="FILE", help="write the rows as JSON")
    c.add_argument("--plot", default=None, metavar="FILE.png", help="write a bar chart")
    c.set_defaults(fn=_compare, stages=None)

    r = sub.add_parser("run", help="run a plan with torchrun (gloo on CPU, NCCL on GPUs)")
    r.add_argument("plan", help="the plan file (written by `autoddl plan`)")
    r.add_argument("--nproc", type=int, default=None, help="processes (default: the plan's)")
    r.add_argument("--steps", type=int, default=1,
                   help="training steps to run (default 1); with --resume, steps more")
    r.add_argument("--check", action="store_true",
                   help="compare loss and gradients with a single-process run")
    r.add_argument("--lr", type=float, default=None,
                   help="learning rate of the plan's optimizer (default: the saved one with --resume, else 1e-3)")
    r.add_argument("--tol", type=float, default=None,
                   help="the largest relative error of loss, gradients and weights --check "
                        "accepts (default: 1e-5 in fp32, "
                        "5e-2 in bf16, see autoddl.runtime.worker.BF16_TOL)")
    r.add_argument("--precision", default=None, choices=PRECISION_CHOICES,
                   help="must be the plan's (default: the plan's, fp32 for an older plan "
                        "file): its bytes were predicted in it")
    r.add_argument("--save", default=None, metavar="DIR",
                   help="save the training state into DIR after every step (DIR/step-N, "
                        "torch distributed checkpoint; the newest complete step is kept)")
    r.add_argument("--resume", default=None, metavar="DIR",
                   help="start from the newest complete step saved in DIR (by --save), running "
                        "--steps more; the plan may place the state differently")
    r.set_defaults(fn=_run)

    from autoddl.runtime.calibrate import (DEFAULT_MAX_BYTES, DEFAULT_MIN_BYTES,
                                           DEFAULT_POINTS, DEFAULT_REPS)
    k = sub.add_parser("calibrate", help="measure collectives and matmul FLOP/s on this machine "
                                         "with torchrun; write a cluster file for --cluster")
    k.add_argument("--nproc", type=int, default=2,
                   help="processes (devices) on this node (default 2)")
    k.add_argument("-o", "--output", required=True, metavar="FILE.toml",
                   help="cluster file to write (required; its timings go beside it in "
                        "FILE.calibration.csv); an existing file is replaced, and the output "
                        "says so")
    k.add_argument("--min-bytes", type=int, default=DEFAULT_MIN_BYTES,
                   help=f"smallest message per device (default {DEFAULT_MIN_BYTES})")
    k.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help=f"largest message per device (default {DEFAULT_MAX_BYTES})")
    k.add_argument("--points", type=int, default=DEFAULT_POINTS,
                   help=f"sizes, geometric between the two (default {DEFAULT_POINTS})")
    k.add_argument("--reps", type=int, default=DEFAULT_REPS,
                   help=f"timed runs per size and collective; the median counts "
                        f"(default {DEFAULT_REPS})")
    k.set_defaults(fn=_calibrate)

    s = sub.add_parser("show", help="print a plan file")
    s.add_argument("plan", help="the plan file (written by `autoddl plan`)")
    s.add_argument("--all", action="store_true", help="include parameters and inputs")
    s.add_argument("--plot", default=None, metavar="FILE.png",
                   help="plot each operator's placement per mesh axis and its "
                        "communication (pipelined: a band of operators per stage)")
    s.set_defaults(fn=_show)

    d = sub.add_parser("demo", help="plan the built-in GPT on 4 CPU devices and run it checked")
    d.add_argument("--model", default=DEMO_MODEL, help=f"model to plan (default {DEMO_MODEL})")
    d.add_argument("--cluster", default="cpu:devices=4",
                   help="cluster to plan for (default cpu:devices=4, run as 4 gloo processes)")
    d.add_argument("-o", "--output", default="plan.json", metavar="FILE.json", help=OUTPUT_HELP)
    d.add_argument("--steps", type=int, default=3, help="checked training steps (default 3)")
    d.set_defaults(fn=_demo)

    b = sub.add_parser("backends", help="list solver backends")
    b.set_defaults(fn=_backends)
    return ap


def one_line(text: str) -> str:
    """``text`` on one line (an error message never spans several)."""
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``autoddl`` command."""
    args = build_parser().parse_args(argv)
    try:
        with raise_on_sigterm():
            return args.fn(args)
    except UserError as exc:
        print(f"autoddl: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoddl: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    except Terminated:
        print("autoddl: terminated; every process it started is stopped", file=sys.stderr)
        return 143
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


def run() -> None:
    """The console script: :func:`main`, then exit without the interpreter's teardown. With
    torch's compiler stack imported (every capture imports it), that teardown alone took 1.1 s
    here; every file this command writes is complete and closed before ``main`` returns."""
    rc = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a reader gone (main handles broken pipes)
            pass
    os._exit(rc)


if __name__ == "__main__":
    run()
