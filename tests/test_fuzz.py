"""Fuzzing the command line (hypothesis): random model specs, cluster specs and damaged plan files.
Every input either gives its output (exit 0, the file written and readable) or exits 2 with one
line on stderr; never a traceback (an exception escaping ``main`` fails the test), never exit 0
without the output. Runs ``autoddl.cli.main`` in this process, so each example costs no start-up.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoddl.cli import main
from autoddl.engine.capture import capture
from autoddl.engine.models import build_model, parse_model_spec
from autoddl.engine.plan import load_plan
from autoddl.engine.repeat import match_plan
from autoddl.errors import UserError

def fuzz(examples: int) -> settings:
    """Hypothesis settings of these tests: reproducible, no deadline, ``examples`` inputs."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
_NUMBERS = st.one_of(st.integers(-2, 6), st.sampled_from(["0", "1e300", "10**18", "nan", "-1",
                                                          "1000000000", "2.5", "x", ""]))


def _outcome(capsys, argv: list[str], output: Path | None) -> int:
    """Run the command; assert it gave its output or one error line; return its exit code."""
    rc = main(argv)
    err = capsys.readouterr().err
    if rc == 0:
        assert output is None or output.is_file(), f"exit 0 without {output}: {argv}"
    else:
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("autoddl: error: "), \
            f"{argv}: exit {rc}, stderr {err!r}"
    return rc


@fuzz(30)
@given(name=st.sampled_from(["mlp", "gpt", "vgg", "gpt-1.7b", "nope"]),
       params=st.dictionaries(st.sampled_from(["layers", "hidden", "heads", "batch", "seq",
                                               "vocab", "depth", "dim_in", "image", "width",
                                               "fc", "classes", "bogus"]),
                              _NUMBERS, max_size=3),
       devices=_NUMBERS, extra=st.sampled_from(["", ",memory_gb=1e300", ",tflops=1e-300",
                                                ",memory_gb=0.00001", ",intra_gbps=nan"]))
def test_plan_gives_a_plan_or_one_line(tmp_path, capsys, name, params, devices, extra):
    small = {"mlp": "batch=8,dim_in=8,hidden=8,dim_out=8",
             "gpt": "layers=1,hidden=16,heads=2,seq=8,batch=4,vocab=32",
             "vgg": "depth=11,batch=2,image=32,width=2,fc=8,classes=4"}.get(name, "")
    given_keys = ",".join(f"{k}={v}" for k, v in params.items())
    base = dict(kv.split("=") for kv in small.split(",") if kv)
    base.update({k: str(v) for k, v in params.items()})
    spec = name + (":" + ",".join(f"{k}={v}" for k, v in base.items()) if base else "")
    if name == "gpt-1.7b" and not given_keys:
        spec = "gpt-1.7b:layers=1,hidden=32,heads=2,seq=8,batch=4,vocab=32"
    out = tmp_path / "p.json"
    _outcome(capsys, ["plan", "--model", spec, "--cluster", f"cpu:devices={devices}{extra}",
                      "-o", str(out), "--time-limit", "60"], out)


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> tuple[dict, object]:
    """A small pipelined GPT plan's data and its model's graph."""
    folder = tmp_path_factory.mktemp("fuzz")
    spec = "gpt:layers=2,hidden=16,heads=2,seq=8,batch=8,vocab=32"
    assert main(["plan", "--model", spec, "--cluster", "cpu:devices=2", "-o",
                 str(folder / "p.json")]) == 0
    data = json.loads((folder / "p.json").read_text())
    model, inputs = build_model(parse_model_spec(spec), "meta")
    if data.get("pipeline"):
        from autoddl.engine.capture import microbatch_inputs
        inputs = microbatch_inputs(inputs, data["pipeline"]["microbatches"])
    return data, capture(model, inputs)


_JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**20),
                         st.floats(allow_nan=True, allow_infinity=True),
                         st.sampled_from(["B", "P", "S(0)", "S(1)", "S(9)", "S(-1)", "x", ""]),
                         st.just([]), st.just({}))


def _paths(value, prefix=()):
    """Every path to a value inside nested dicts and lists."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:6]):
            yield from _paths(v, prefix + (i,))


def _mutate(data, path, new):
    """``data`` with the value at ``path`` replaced by ``new`` (deleted when ``new`` is ...)."""
    data = json.loads(json.dumps(data))
    if not path:
        return new if new is not ... else {}
    holder = data
    for key in path[:-1]:
        holder = holder[key]
    if new is ...:
        del holder[path[-1]]
    else:
        holder[path[-1]] = new
    return data


@fuzz(150)
@given(data=st.data())
def test_damaged_plan_files_show_or_give_one_line(tmp_path, capsys, planned, data):
    plan_data, graph = planned
    paths = list(_paths(plan_data))
    damaged = plan_data
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        damaged = _mutate(damaged, path, data.draw(st.one_of(_JSON_LEAVES, st.just(...))))
        paths = list(_paths(damaged)) or [()]
    text = json.dumps(damaged, allow_nan=True)
    (tmp_path / "bad.json").write_text(text)
    if _outcome(capsys, ["show", str(tmp_path / "bad.json")], None) != 0:
        return
    plan = load_plan(tmp_path / "bad.json")  # what `run` loads before launching
    try:  # what each rank checks once it has the model's graph
        match_plan(plan, graph)
    except UserError:
        pass
    numbers = [plan.cost["total_s"], plan.memory["per_device_bytes"]]
    assert all(math.isfinite(x) for x in numbers)
