"""Progress of long work: `autoddl plan -v` reports capture, screening k/N and each ILP with the
best plan and the global gap; on a terminal the same is one status line rewritten in place and
cleared at the end; on a pipe without -v, nothing."""

from __future__ import annotations

import io
import re

from autoddl.cli import Progress, main

MODEL = "mlp:batch=16,dim_in=8,hidden=16,layers=1,dim_out=8"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_status_line_on_a_terminal_only():
    tty, pipe = _Tty(), io.StringIO()
    for stream in (tty, pipe):
        p = Progress(verbose=False, stream=stream)
        p("screening 1/2 candidates")
        p("ILP 1/2 x2: optimal; best 1 s, global gap 0 %")
        p.done()
    assert tty.getvalue() == ("\r\x1b[Kscreening 1/2 candidates"
                              "\r\x1b[KILP 1/2 x2: optimal; best 1 s, global gap 0 %\r\x1b[K")
    assert pipe.getvalue() == ""
    verbose = _Tty()
    Progress(verbose=True, stream=verbose)("screening 1/2 candidates")
    assert verbose.getvalue() == "  screening 1/2 candidates\n"


def test_plan_verbose_reports_capture_screening_and_gap(tmp_path, capsys):
    assert main(["plan", "--model", MODEL, "--cluster", "cpu:devices=4", "--workers", "1",
                 "-o", str(tmp_path / "p.json"), "-v"]) == 0
    err = capsys.readouterr().err
    assert f"capturing {MODEL}" in err
    assert re.search(r"screening (\d+)/\1 candidates", err), err
    assert "screened" in err and "ILPs solved" in err, err


def test_ilp_progress_names_best_and_global_gap(tmp_path, capsys):
    from autoddl.engine.planner import plan_graph
    from tests.helpers import cluster, mlp_graph

    lines: list[str] = []
    plan_graph(mlp_graph(batch=8, d_in=4, hidden=16, d_out=4), cluster(devices=4),
               model_spec="mlp", workers=1, screen=False, log=lines.append)
    ilp = [ln for ln in lines if ln.startswith("ILP ")]
    assert ilp and all(re.match(r"ILP \d+/\d+ ", ln) for ln in ilp), lines
    # proven within the requested relative gap (default 1e-6, printed in %)
    gap = re.search(r"global gap ([\d.e+-]+) %", ilp[-1])
    assert gap and float(gap.group(1)) <= 1e-4 * (1 + 1e-6), lines
