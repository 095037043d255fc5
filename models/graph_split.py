"""Cutting any PyTorch network at module names: ``torch.fx`` traces it, the cuts split the graph.

A network whose ``forward`` is more than a chain of children (DenseNet's concatenations, a
ResNet's skips, a ``forward`` written by hand) has no "top-level blocks" to hand out. Its graph
does: ``torch.fx.symbolic_trace`` records every call, with the module it came from
(``nn_module_stack``), and the graph is cut into segments at those calls.

Why ``torch.fx`` and not ``torch.distributed.pipelining`` (which splits through
``torch.export``): an exported graph is specialised to the example's batch size and to the
train/eval mode it was captured in, and functionalised, so BatchNorm's running statistics and
dropout would need a second graph per mode and a dynamic-shape spec per cut. A traced graph
calls the same leaf modules (convolutions, norms, dropout) the network holds, in the mode they
are in, for any batch: the segments train, evaluate and export like the network itself, and
share its parameters under their original names. torchvision's feature extraction is built on
the same tracer.

A **cut after module X** falls after the last operation traced inside X. It is a valid cut only
where exactly one tensor crosses it (our protocol moves one activation tensor per step); the
candidates are listed in forward order, so an integer cut still counts "after this many".
Networks whose traced graph depends on ``self.training`` outside the standard layers (e.g.
torchvision's stochastic depth, a function of ``self.training``) would freeze one mode into the
graph: such modules are traced as leaves (``leaf_modules``), and a network whose train and eval
graphs still differ is refused naming the problem.
"""

from __future__ import annotations

import copy
import importlib
import sys
import threading
from collections.abc import Iterable, Sequence

from torch import fx, nn

from models.config_errors import ModelError

# fx's tracer patches torch globally while it runs: one trace at a time in a process (the
# in-process runner validates the same plan in several threads).
_TRACE_LOCK = threading.Lock()

# Modules whose forward reads self.training, traced as leaves wherever they are importable.
DEFAULT_LEAVES = ("torchvision.ops.stochastic_depth.StochasticDepth",)


class GraphSplitError(ModelError):
    """The network cannot be traced or cut as asked; the message says where and why."""


class _Tracer(fx.Tracer):
    """fx's tracer, with extra leaf classes (besides torch.nn's own layers)."""

    def __init__(self, leaves: tuple[type[nn.Module], ...]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)


def leaf_classes(names: Iterable[str]) -> tuple[type[nn.Module], ...]:
    """The classes named ``package.module.Class``. A default is taken only if its module is
    already imported (the network that uses it imported it); a name the plan gives that does
    not import is refused."""
    found: list[type[nn.Module]] = []
    for name in names:
        module_name, _, attr = name.rpartition(".")
        if name in DEFAULT_LEAVES and module_name not in sys.modules:
            continue
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError):
            if name in DEFAULT_LEAVES:
                continue
            raise GraphSplitError(f"leaf_modules: cannot import {name!r}") from None
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise GraphSplitError(f"leaf_modules: {name!r} is not an nn.Module class")
        found.append(cls)
    return tuple(found)


def as_graph_module(
    model: nn.Module, leaves: tuple[type[nn.Module], ...], key: str
) -> fx.GraphModule:
    """``model`` as a graph module holding the same submodules under the same names.

    A network is traced once per ``key`` (its architecture and arguments: the graph names
    submodules, it holds no weights); later builds wrap the same graph around their own
    instance. Tracing patches torch process-wide while it runs, so tracing again at every
    build would disturb any other thread running a model meanwhile (the in-process runner's
    parties; a site exporting while a neighbour trains). The first trace also checks that the
    graph does not depend on train or eval mode.
    """
    with _TRACE_LOCK:
        graph = _GRAPHS.get(key)
        if graph is None:
            graph = _mode_independent_graph(model, leaves)
            _GRAPHS[key] = graph
    return fx.GraphModule(model, copy.deepcopy(graph), class_name=type(model).__name__)


_GRAPHS: dict[str, fx.Graph] = {}


def _trace(model: nn.Module, leaves: tuple[type[nn.Module], ...]) -> fx.Graph:
    try:
        return _Tracer(leaves).trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, ... from user code
        raise GraphSplitError(
            f"torch.fx cannot trace {type(model).__name__}: {exc} (data-dependent control flow "
            "in forward? list the module that has it in leaf_modules)"
        ) from None


def _mode_independent_graph(model: nn.Module, leaves: tuple[type[nn.Module], ...]) -> fx.Graph:
    """The traced graph, refused if it differs between train and eval mode."""
    was_training = model.training
    try:
        train_graph = _trace(model.train(), leaves)
        eval_graph = _trace(model.eval(), leaves)
    finally:
        model.train(was_training)
    if train_graph.python_code("self").src != eval_graph.python_code("self").src:
        raise GraphSplitError(
            f"{type(model).__name__}'s forward reads self.training outside torch.nn's layers, "
            "so one traced graph cannot both train and evaluate; list that module's class in "
            "model.leaf_modules"
        )
    return train_graph


def _owners(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [name for name in stack if name]


def traced_modules(graph_module: fx.GraphModule) -> set[str]:
    """Every module some operation of the graph runs in."""
    return {name for node in graph_module.graph.nodes for name in _owners(node) if "@" not in name}


def cut_candidates(graph_module: fx.GraphModule) -> dict[str, int]:
    """Module names after which exactly one tensor crosses the graph, in forward order, with
    the index of the operation they end at.

    A module's position is its last operation; a module whose operations are not one
    contiguous stretch of the graph (called twice, interleaved) is not a candidate.
    """
    nodes = [n for n in graph_module.graph.nodes if n.op not in ("get_attr", "output")]
    index = {node: i for i, node in enumerate(nodes)}
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for owner in _owners(node):
            first.setdefault(owner, i)
            last[owner] = i
    last_use = {
        node: max((index.get(user, len(nodes)) for user in node.users), default=-1)
        for node in nodes
    }
    candidates: dict[str, int] = {}
    for owner in sorted(last, key=lambda name: (last[name], -len(name))):
        if "@" in owner:
            continue  # a module called more than once: fx names its later calls name@N
        end = last[owner]
        if end >= len(nodes) - 1:
            continue  # nothing after it
        inside = range(first[owner], end + 1)
        if any(owner not in _owners(nodes[i]) for i in inside if nodes[i].op != "placeholder"):
            continue
        crossing = [n for n in nodes[: end + 1] if last_use[n] > end]
        if len(crossing) == 1:
            candidates[owner] = end
    return candidates


def split_graph(graph_module: fx.GraphModule, cuts: Sequence[str]) -> list[fx.GraphModule]:
    """The segments between consecutive ``cuts`` (module names from ``cut_candidates``).

    Each segment is a graph module holding the network's own submodules (shared, not copied)
    under their original names, so its state-dict keys are the network's keys. (fx's
    ``split_module`` renames them ``layer1_0_conv1``, hence this small splitter of our own.)
    """
    nodes = [n for n in graph_module.graph.nodes if n.op not in ("get_attr", "output")]
    index = {node: i for i, node in enumerate(nodes)}
    ends = []
    for cut in cuts:
        positions = [i for i, node in enumerate(nodes) if cut in _owners(node)]
        if not positions:
            raise GraphSplitError(f"no operation of the network runs in {cut!r}")
        ends.append(positions[-1])
    bounds = [-1, *ends, len(nodes) - 1]
    output = next(n for n in graph_module.graph.nodes if n.op == "output")
    segments = []
    for number in range(len(bounds) - 1):
        start, end = bounds[number] + 1, bounds[number + 1]
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        if number > 0:
            crossing = _crossing(nodes, index, bounds[number])
            env[crossing] = graph.placeholder("x")
        for node in nodes[start : end + 1]:
            for attr in _attributes(node):
                if attr not in env:
                    env[attr] = graph.node_copy(attr)
            env[node] = graph.node_copy(node, env.__getitem__)
        if number == len(bounds) - 2:
            graph.output(fx.map_arg(output.args[0], env.__getitem__))
        else:
            graph.output(env[_crossing(nodes, index, end)])
        graph.lint()
        segments.append(fx.GraphModule(graph_module, graph, class_name=f"Segment{number}"))
    _refuse_shared_attributes(segments)
    return segments


def _crossing(nodes: list[fx.Node], index: dict[fx.Node, int], end: int) -> fx.Node:
    """The one value computed at or before ``end`` and used after it."""
    crossing = [
        n for n in nodes[: end + 1] if any(index.get(user, len(nodes)) > end for user in n.users)
    ]
    if len(crossing) != 1:
        names = ", ".join(n.name for n in crossing)
        raise GraphSplitError(f"{len(crossing)} values cross this cut ({names}), not one tensor")
    return crossing[0]


def _attributes(node: fx.Node) -> list[fx.Node]:
    """The ``get_attr`` nodes (parameters used directly) among a node's inputs."""
    return [n for n in node.all_input_nodes if n.op == "get_attr"]


def _refuse_shared_attributes(segments: list[fx.GraphModule]) -> None:
    """A tensor used on both sides of a cut (tied weights) cannot live in two places."""
    seen: dict[str, int] = {}
    for number, segment in enumerate(segments):
        for key in segment.state_dict():
            if key in seen:
                raise GraphSplitError(
                    f"{key!r} is used on both sides of a cut (tied weights); cut elsewhere"
                )
            seen[key] = number
