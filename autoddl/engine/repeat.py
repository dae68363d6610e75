"""Repeated layers: find them, solve one representative with a multiplicity, expand the plan.

A model of L identical blocks (a ModuleList of transformer layers) is reduced to five parts:
the prefix (before the first block), the **first** block, one **mid** block standing for blocks
1..L−2, the **last** block, and the suffix. The mid block's nodes and internal edges count L−2
times; the edge pattern from block i to block i+1 appears once first→mid, once mid→last and, as
an extra edge from the mid block to itself, L−3 times. The first and last blocks (next to the
embedding and the head, or to a stage boundary) may therefore take other strategies than the
middle ones; the middle blocks share one. That is the reduction's assumption: without a
memory cap that binds it gives the unreduced optimum (tests/test_repeat.py); under one, the
unreduced problem may mix strategies over the middle blocks and be cheaper
(experiments/results/repeat_memory.md: up to 0.46 % on a 5-layer GPT). Nodes get canonical names (``first/7``, ``mid/7``,
``pre/embedding``, ``post/3``), so the reduced graph is the same whether it came from a capture
of all L layers or of three.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from dataclasses import dataclass

from autoddl.engine.costs import Multiplicity
from autoddl.engine.graph import OpGraph
from autoddl.engine.plan import OpPlacement, Plan

_SCOPE = re.compile(r"^(.+)\.(\d+)$")


@dataclass(frozen=True)
class Blocks:
    """Identical consecutive blocks of a graph: node names of each, position by position."""

    container: str
    members: tuple[tuple[str, ...], ...]

    @property
    def count(self) -> int:
        """Number of blocks."""
        return len(self.members)


def _signature(graph: OpGraph, name: str, pos: dict[str, tuple[int, int]], block: int) -> tuple:
    """What must agree between position-mates of different blocks."""
    n = graph[name]
    refs = []
    for i in n.inputs:
        if i in pos and pos[i][0] == block:
            refs.append(("in", pos[i][1]))
        elif i in pos and pos[i][0] == block - 1:
            refs.append(("prev", pos[i][1]))
        elif i in pos:
            refs.append(("far", None))
        else:
            refs.append(("outside", i if block > 0 else None))
    return (n.kind, n.target, n.out, n.args, n.kwargs, n.flops, n.requires_grad, tuple(refs))


def find_blocks(graph: OpGraph, minimum: int = 3) -> Blocks | None:
    """The longest run of identical numbered blocks (``blocks.0`` … ``blocks.L-1``), if any."""
    by_scope: dict[str, list[str]] = defaultdict(list)
    for n in graph.nodes:
        if n.scope:
            by_scope[n.scope].append(n.name)
    containers: dict[str, dict[int, list[str]]] = defaultdict(dict)
    for scope, names in by_scope.items():
        m = _SCOPE.match(scope)
        if m:
            containers[m.group(1)][int(m.group(2))] = names
    best = None
    for container, blocks in containers.items():
        count = len(blocks)
        if count < minimum or sorted(blocks) != list(range(count)):
            continue
        members = tuple(tuple(blocks[i]) for i in range(count))
        if len({len(m) for m in members}) != 1:
            continue
        pos = {name: (b, j) for b, m in enumerate(members) for j, name in enumerate(m)}
        sigs = [[_signature(graph, nm, pos, b) for nm in m] for b, m in enumerate(members)]
        if any(sigs[b] != sigs[1] for b in range(2, count)):
            continue
        first_ok = all(s0[:7] == s1[:7] for s0, s1 in zip(sigs[0], sigs[1]))
        far = any(r[0] == "far" for s in sigs[1] for r in s[7])
        consumers_ok = _consumers_ok(graph, pos, count)
        if first_ok and not far and consumers_ok and (best is None or count > best.count):
            best = Blocks(container, members)
    return best


def _consumers_ok(graph: OpGraph, pos: dict[str, tuple[int, int]], count: int) -> bool:
    """Block i feeds only itself, block i+1, and (the last block) the suffix."""
    seen_block = False
    for n in graph.nodes:
        if n.name in pos and n.kind == "op":
            seen_block = True
        for i in n.inputs:
            if i not in pos:
                continue
            b = pos[i][0]
            if n.name in pos:
                if pos[n.name][0] not in (b, b + 1):
                    return False
            elif b != count - 1 or not seen_block:
                return False
    return True


@dataclass(frozen=True, eq=False)
class Reduced:
    """A reduced graph (canonical names), its multiplicities, and the real layer count."""

    graph: OpGraph
    mult: Multiplicity
    layers: int
    block_size: int
    container: str
    param_count: int


def _canonical(graph: OpGraph, blocks: Blocks | None) -> dict[str, str]:
    """Canonical names of every node of a graph with (or without) repeated blocks."""
    if blocks is None:
        return {n.name: n.name for n in graph.nodes}
    pos = {name: (b, j) for b, m in enumerate(blocks.members) for j, name in enumerate(m)}
    last = blocks.count - 1
    names, seen_block, post = {}, False, 0
    for n in graph.nodes:
        if n.name in pos:
            seen_block = seen_block or n.kind == "op"
            b, j = pos[n.name]
            tag = "first" if b == 0 else ("last" if b == last else "mid")
            names[n.name] = f"{tag}/{j}" if tag != "mid" else f"mid{b}/{j}"
        elif not seen_block or n.kind != "op":
            names[n.name] = f"pre/{n.name}"
        else:
            names[n.name] = f"post/{post}"
            post += 1
    return names


def block_outputs(graph: OpGraph, blocks: Blocks) -> set[int]:
    """Positions of a block whose outputs leave it (read by the next block or the suffix)."""
    inside = set(blocks.members[1])
    pos = {name: j for j, name in enumerate(blocks.members[1])}
    out = set()
    for n in graph.nodes:
        if n.name not in inside:
            out |= {pos[i] for i in n.inputs if i in pos}
    return out


def reduce_graph(graph: OpGraph, blocks: Blocks, layers: int | None = None) -> Reduced:
    """Keep prefix, first, one mid, last block and suffix; multiplicities for ``layers`` blocks.

    ``layers`` is the real block count when ``graph`` was captured with fewer (a preset built
    with three layers to capture fast); by default the graph's own count.
    """
    L = layers or blocks.count
    assert blocks.count >= 3 and L >= 3
    names = _canonical(graph, blocks)
    keep_mid = set(blocks.members[1])
    pos = {name: (b, j) for b, m in enumerate(blocks.members) for j, name in enumerate(m)}
    last = blocks.count - 1
    dropped = {nm for b in range(2, last) for nm in blocks.members[b]}
    remap = {nm: blocks.members[1][pos[nm][1]] for b in range(2, last)
             for nm in blocks.members[b]}  # the last block reads what block L-2 made: use mid
    nodes = []
    for n in graph.nodes:
        if n.name in dropped:
            continue
        ins = tuple(names[remap.get(i, i)] for i in n.inputs)
        new = names[n.name].replace("mid1/", "mid/")
        nodes.append(dataclasses.replace(n, name=new, inputs=tuple(
            i.replace("mid1/", "mid/") for i in ins)))
    reduced = OpGraph(tuple(nodes), names[graph.loss])
    mid = L - 2
    node_mult = {names[nm].replace("mid1/", "mid/"): mid for nm in keep_mid}
    edge_mult: dict[tuple[str, str, int], int] = {}
    extra = []
    for n in reduced.nodes:
        if not n.name.startswith("mid/"):
            continue
        for i, src in enumerate(n.inputs):
            if src.startswith("first/"):
                continue  # block 0 -> block 1: once
            edge_mult[(src, n.name, i)] = mid
    for n in graph.nodes:  # block 1 -> block 2 pattern, as mid -> mid, L-3 times
        if n.name in blocks.members[2]:
            for i, src in enumerate(n.inputs):
                if src in pos and pos[src][0] == 1:
                    j_src, j_dst = pos[src][1], pos[n.name][1]
                    extra.append((f"mid/{j_src}", f"mid/{j_dst}", i, L - 3))
    per_block = sum(graph[nm].out.numel for nm in blocks.members[1] if graph[nm].kind == "param")
    params = graph.param_count + (L - blocks.count) * per_block
    mult = Multiplicity(node_mult, edge_mult, tuple(extra))
    return Reduced(reduced, mult, L, len(blocks.members[0]), blocks.container, params)


def expand_plan(plan: Plan, graph: OpGraph) -> Plan:
    """The plan of a reduced graph (or pipelined program), written out for every node of the
    full ``graph``, each with its real stage (model chunk when interleaved)."""
    from autoddl.engine.programs import stage_of_real_block

    blocks = find_blocks(graph)
    assert blocks is not None, "plan has repeated layers, the graph none"
    pos = {name: (b, j) for b, m in enumerate(blocks.members) for j, name in enumerate(m)}
    program = bool(plan.pipeline)
    names = _canonical(graph, blocks)
    post = [n.name for n in graph.nodes if names[n.name].startswith("post/")]
    ops = []
    for n in graph.nodes:
        if n.name in pos:
            b, j = pos[n.name]
            if program:
                stage, inst = stage_of_real_block(b, blocks.count, plan.num_stages,
                                                  plan.interleave)
                canon = f"{inst}/{j}"
            else:
                stage, tag = 0, ("first" if b == 0 else "last" if b == blocks.count - 1 else "mid")
                canon = f"{tag}/{j}"
        elif n.name in post:
            stage, canon = plan.num_chunks - 1, f"post/{post.index(n.name)}"
        else:
            stage, canon = 0, f"pre/{n.name}"
        src: OpPlacement = plan.op(canon)
        ops.append(dataclasses.replace(src, name=n.name, stage=stage, module=n.module))
    stage_of = {o.name: o.stage for o in ops}
    for i, o in enumerate(ops):  # parameters and inputs live with (or relay to) their consumers
        if graph[o.name].kind == "param":
            consumers = [c.name for c in graph.nodes if o.name in c.inputs]
            ops[i] = dataclasses.replace(o, stage=min(stage_of[c] for c in consumers))
    return dataclasses.replace(plan, ops=tuple(ops))


def represented_layers(group: str, layers: int, stages: int = 1, interleave: int = 1
                       ) -> list[int]:
    """The real layers (indices in the container) that the representative ``group`` of a
    reduced graph (``first``, ``mid``, ``last``) or of a pipelined program (``s0.first``,
    ``sm.b1``, ... :func:`~autoddl.engine.programs.stage_of_real_block`) stands for; none for
    the prefix, the suffix and names of no group."""
    if stages == 1:
        return {"first": [0], "mid": list(range(1, layers - 1)),
                "last": [layers - 1]}.get(group, []) if layers >= 3 else []
    from autoddl.engine.programs import stage_of_real_block

    if not group or group in ("pre", "post") or layers % (stages * interleave):
        return []
    return [i for i in range(layers)
            if stage_of_real_block(i, layers, stages, interleave)[1] == group]


#: runs of layer indices written out in a module path before the rest are elided
_MAX_RUNS = 4


def layer_set_text(indices: list[int]) -> str:
    """Layer indices as a module path writes them: ``3``; several in braces, runs of three or
    more as ``a..b`` (``{1..6}``, ``{2,4}``, ``{5..6,9..10}``), the middle runs of many
    elided (``{1..2,5..6,…,29..30}``)."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    if len(runs) == 1 and len(runs[0]) == 1:
        return str(runs[0][0])
    parts = [(f"{r[0]}..{r[-1]}" if len(r) >= 3 else ",".join(map(str, r))) for r in runs]
    if len(parts) > _MAX_RUNS:
        parts = parts[:_MAX_RUNS - 2] + ["…"] + parts[-1:]
    return "{" + ",".join(parts) + "}"


def real_module(module: str, container: str, indices: list[int]) -> str:
    """``module``, a path inside the representative layer that was captured
    (``blocks.1.fc1``, a parameter's ``blocks.1.fc1.weight``), with its layer index replaced by
    the real layers ``indices`` it stands for (``blocks.{1..6}.fc1``); unchanged outside the
    container or without indices."""
    m = re.match(rf"{re.escape(container)}\.\d+(?=\.|$)", module)
    if m is None or not indices:
        return module
    return f"{container}.{layer_set_text(indices)}{module[m.end():]}"


def real_modules(names_modules: list[tuple[str, str]], repeat: dict | None, stages: int = 1,
                 interleave: int = 1) -> list[str]:
    """The module path of each (node name, captured module) of a plan of repeated layers
    (``repeat``: the plan's ``model.repeat``; None: no repeated layers, the paths as
    captured), naming the real layers its representative stands for: the first layer's ops
    say ``blocks.0``, the middle ones' ``blocks.{1..6}``."""
    if not repeat:
        return [module for _, module in names_modules]
    cache: dict[str, list[int]] = {}
    out = []
    for name, module in names_modules:
        group = name.split("/")[0] if "/" in name else ""
        if group not in cache:
            cache[group] = represented_layers(group, int(repeat["layers"]), stages, interleave)
        out.append(real_module(module, repeat["container"], cache[group]))
    return out


def match_plan(plan: Plan, graph: OpGraph) -> Plan:
    """Check that ``plan`` was made for ``graph`` (by graph hash) and return it written out for
    every node of the graph (plans of repeated layers name representatives only)."""
    from autoddl.engine.plan_check import check_against_graph
    from autoddl.engine.programs import build_program
    from autoddl.errors import UserError

    stale = ("plan was made for a different graph of this model (graph hash differs); re-run "
             "`autoddl plan` with this autoddl and torch")
    rep = plan.model.get("repeat")
    if rep is None:
        if graph.digest() != plan.model["graph_hash"]:
            raise UserError(stale)
        check_against_graph(plan, graph)
        return plan
    blocks = find_blocks(graph)
    if blocks is None or blocks.count != rep["layers"]:
        raise UserError(f"plan is for {rep['layers']} repeated layers; this model has "
                        f"{0 if blocks is None else blocks.count}: re-run `autoddl plan`")
    if plan.pipeline:
        reduced = build_program(graph, blocks, blocks.count, plan.num_stages,
                                plan.num_microbatches).graph
    else:
        reduced = reduce_graph(graph, blocks).graph
    if reduced.digest() != plan.model["graph_hash"]:
        raise UserError(stale)
    full = expand_plan(plan, graph)
    check_against_graph(full, graph)
    return full
