"""`group-convs`: turn dense convs into grouped convs via channel permutations
(Zhao & Luk, "Efficient Structured Pruning and Architecture Searching for Group
Convolution").

Decide.  For each eligible conv with weight ``W`` (``F x C x k...``) the pair scores
``S_fc`` (``l2``/``l1`` norm of the kernel slice, or the first-order Taylor score
``|<W_fc, dL/dW_fc>|`` with ``criterion=taylor``: from calibration data,
``gp.run(graph, "group-convs{criterion=taylor,...}", data=batches)``, accumulated per batch as
``S_fc = sum_b |<W_fc, dL_b/dW_fc>|`` (:func:`taylor_pair_scores`); or from precomputed
scores, ``scores={weight key: S (F x C)}`` (:func:`graphprune.training.gconv.taylor_scores`
computes the same on a model); or ``gradients={weight key: dL/dW}``, scored
``|<W_fc, sum_b dL_b/dW_fc>|``)
are normalised to sum 1, and for every candidate group count ``G`` (a common divisor of
``F`` and ``C``) :mod:`graphprune.blockperm` finds row and column labellings whose
``G`` diagonal blocks hold as much score mass as it can; ``cost(G) = 1 - kept(G)``.
The group counts come from

* ``groups=G``  — every eligible conv that ``G`` divides gets ``G`` groups;
* ``budget=b``  — a search: start with every conv at its cheapest candidate (the largest
  count, bounded by ``max_groups`` and ``min_channels_per_group``); repeatedly make the
  move of one conv to a smaller count that lowers the total cost ``sum_l cost_l(G_l)`` most
  per unit of budget spent, among the moves that keep the total within ``b`` times the
  original conv parameters (``budget_unit=params``), MACs (``budget_unit=macs``) or
  measured latency (``budget_unit=latency``: onnxruntime CPU, one thread, each conv timed
  alone at every candidate count) of *all* convs of the graph (convs that cannot be grouped
  count at their fixed cost).  The budget is checked before each move is made, so the
  search never overshoots it; a budget that even the cheapest state exceeds raises
  :class:`~graphprune.passes_base.BudgetError`;
* ``lossless=true`` — only group counts whose off-block weight is exactly zero under the
  found permutation (alone: the largest such count per conv; with ``groups`` or
  ``budget``: restricts their candidates).

``max_groups`` and ``min_channels_per_group`` (per group, on both the input and the output
side) bound the candidates of the search and of ``lossless``; an explicit ``groups=G``
is applied wherever ``G`` divides both channel counts.  ``ns`` is the heuristic's number
of alternating sorts per block (``N_S``).

Rewrite (exact).  Reordering the channels of a coupling group (every producer's filters,
every per-channel parameter on the way, every consumer's columns, alike) does not change
the function.  So a grouped conv's input permutation folds into the coupling group that
feeds it, and its output permutation into the group it produces.  Each coupling group
takes one order: the identity or the order one of its grouped convs asks for, whichever
satisfies most of its grouped convs; the order is checked against every channel map of
the group (concat offsets, flattens, grouped convs) and dropped if any map would break.
A conv whose input (output) order is not met gets a channel gather
(:meth:`Graph.insert_gather`) on its input (on its output, restoring the group's order
for every consumer); ``fold=false`` keeps every group's order, so every permutation that
is not the identity becomes a gather (for comparison).  The grouped conv's weight is ``(W * M)[tau][:, a]`` cut into its
``G`` diagonal blocks and reshaped to ``(F, C/G, k...)``, where ``M`` is the block mask
(in the original layout), ``tau`` the order the conv now produces its filters in and
``a`` the order it reads its input channels in; its bias is ``b[tau]``.  The result equals
the projected reference: the input graph with every grouped conv's weight times ``M``.

Handled: plain chains, residual streams (one order per stream, gathers for the rest),
bottlenecks, depthwise-separable blocks (pointwise convs are grouped, depthwise convs stay
depthwise), concats and flattens (when the order respects their maps), 1d/2d/3d convs.
Not grouped: convs that are already grouped or depthwise (skipped, not refined), convs
whose output is a model output (their filter order could not be restored without a gather
on the model output), transposed convs, convs with shared weights, ``ignore``-d convs.
Coupling groups that are frozen (model inputs/outputs, ops without a channel rule) keep
their order, so their grouped convs get gathers.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping, Sequence

import numpy as np

from graphprune import blockperm
from graphprune.arrays import as_numpy
from graphprune.blockperm import BlockSolution
from graphprune.channels import reindex_params
from graphprune.cost import node_macs
from graphprune.coupling import PruningGroup, analyse
from graphprune.graph import Graph, Node, Port
from graphprune.names import resolve_names
from graphprune.pass_api import BudgetError, Pass, PassOptionError, PassResult, register_pass
from graphprune.projection import Projection

__all__ = ["GroupConvs", "accumulate_gradients", "search_groups", "taylor_pair_scores"]

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

UNITS = ("params", "macs", "latency")


# ===================================================================== layers
@dataclass
class _Layer:
    """One eligible conv: its scores, candidate group counts and their block solutions."""

    node: Node
    weight_key: str
    bias_key: str | None
    filters: int
    channels: int
    macs: int
    weight_params: int
    bias_params: int
    scores: np.ndarray  # normalised criterion scores (F x C)
    magnitude: np.ndarray  # l2 pair norms (F x C): exact zeros for lossless checks
    candidates: list[int] = field(default_factory=list)  # ascending, 1 first
    solutions: dict[int, BlockSolution] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.node.label or self.node.name

    def cost(self, groups: int) -> float:
        """Score mass pruned by ``groups`` groups."""
        return 0.0 if groups == 1 else 1.0 - self.solutions[groups].kept

    def resource(self, groups: int, unit: str) -> float:
        if unit == "macs":
            return self.macs / groups
        return self.weight_params / groups + self.bias_params


def _common_divisors(a: int, b: int) -> list[int]:
    g = math.gcd(a, b)
    return [d for d in range(1, g + 1) if g % d == 0]


def _shared_keys(graph: Graph) -> set[str]:
    users: dict[str, int] = {}
    for node in graph.nodes:
        for key in node.params.values():
            users[key] = users.get(key, 0) + 1
    return {k for k, n in users.items() if n > 1}


def _why_not_eligible(graph: Graph, node: Node, ignore: set[str], shared: set[str]) -> str | None:
    """Why ``node`` cannot become a grouped conv, or ``None`` if it can."""
    if node.kind != "conv":
        return "not a conv"
    if node.name in ignore:
        return "ignored"
    if int(node.attrs.get("groups", 1)) != 1:
        return "already grouped (skipped, not refined)"
    key = node.params.get("weight")
    if key is None or key in shared:
        return "its weight is missing or shared"
    if any(v in graph.outputs for v in node.outputs):
        return "its output is a model output"
    if graph.shape(node.inputs[0]) is None or graph.shape(node.outputs[0]) is None:
        return "unknown shapes"
    if graph.param(key).ndim < 3:
        return "weight has no kernel axes"
    return None


def _conv_params(graph: Graph, node: Node) -> int:
    return sum(int(graph.param(k).size) for r, k in node.params.items() if r in ("weight", "bias"))


# ====================================================================== pass
@register_pass
@dataclass(frozen=True)
class GroupConvs(Pass):
    """Turn dense convs into grouped convs, folding the channel permutations into the
    neighbouring layers (see the module docstring for the cases handled and refused).

    Options:
        groups: give every eligible conv this many groups (where it divides both channel counts).
        budget: search group counts per conv keeping at most this fraction of the convs'
            budget_unit, in (0, 1].
        budget_unit: what budget counts: params, macs or latency (onnxruntime, CPU).
        max_groups: largest group count considered.
        min_channels_per_group: fewest input (and output) channels per group.
        ns: alternating sorts per block of the permutation heuristic.
        criterion: pair score: l2, l1, or taylor (needs data, gradients or scores).
        lossless: only group counts whose off-block weight is exactly zero (alone: the
            largest per conv; with groups or budget: restricts their candidates).
        fold: fold the permutations into neighbouring layers (false: a gather for each).
        ignore: convs left dense (node names, module paths or prefixes).
        gradients: Python only: {weight key: dL/dW} for criterion=taylor.
        scores: Python only: {weight key: F x C pair scores} for criterion=taylor.
    """

    name = "group-convs"
    uses_data: ClassVar[bool] = True
    groups: int | None = None
    budget: float | None = None
    budget_unit: str = "params"
    max_groups: int = 32
    min_channels_per_group: int = 4
    ns: int = 10
    criterion: str = "l2"
    lossless: bool = False
    fold: bool = True
    ignore: tuple[str, ...] = ()
    gradients: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)
    scores: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

    def spec(self) -> str:
        """Pipeline syntax; ``gradients`` and ``scores`` (tensors) have none and are left out."""
        if self.gradients is None and self.scores is None:
            return super().spec()
        import dataclasses

        return dataclasses.replace(self, gradients=None, scores=None).spec()

    def validate(self) -> None:
        n = self.name
        if self.groups is not None and self.groups < 2:
            raise PassOptionError(f"{n}: groups must be at least 2, got {self.groups}")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise PassOptionError(f"{n}: budget must be in (0, 1], got {self.budget}")
        if self.groups is not None and self.budget is not None:
            raise PassOptionError(f"{n}: give groups or budget, not both")
        if self.groups is None and self.budget is None and not self.lossless:
            raise PassOptionError(f"{n}: needs groups=, budget= or lossless=true")
        if self.budget_unit not in UNITS:
            raise PassOptionError(f"{n}: budget_unit must be one of {', '.join(UNITS)}, got `{self.budget_unit}`")
        if self.max_groups < 2:
            raise PassOptionError(f"{n}: max_groups must be at least 2, got {self.max_groups}")
        if self.min_channels_per_group < 1:
            raise PassOptionError(f"{n}: min_channels_per_group must be at least 1, got {self.min_channels_per_group}")
        if self.ns < 1:
            raise PassOptionError(f"{n}: ns must be at least 1, got {self.ns}")
        if self.criterion not in blockperm.CRITERIA:
            raise PassOptionError(f"{n}: unknown criterion `{self.criterion}` (known: {', '.join(blockperm.CRITERIA)})")
        if self.scores is not None and self.criterion != "taylor":
            raise PassOptionError(f"{n}: scores= are Taylor pair scores; they need criterion=taylor")

    def requires_data(self, data: Any) -> None:
        if self.criterion == "taylor" and self.gradients is None and self.scores is None and data is None \
                and not self.lossless:
            raise PassOptionError(
                f"{self.name}: criterion=taylor needs gradients={{weight key: dL/dW}} (see accumulate_gradients), "
                "scores={weight key: F x C Taylor pair scores} (see graphprune.training.gconv.taylor_scores) "
                "or calibration data: gp.run(graph, pipeline, data=batch_or_loader)"
            )

    # ------------------------------------------------------------------ call
    def call(self, graph: Graph, data: Any = None) -> PassResult:
        if self.criterion == "taylor" and self.gradients is None and self.scores is None:
            if data is None:  # lossless: the decision needs no scores; they only grade the kept mass
                return dataclasses.replace(self, criterion="l2").call(graph)
            scores = taylor_pair_scores(graph, data, [n for n in graph.nodes if n.kind == "conv"
                                                      and int(n.attrs.get("groups", 1)) == 1 and "weight" in n.params])
            return dataclasses.replace(self, scores=scores).call(graph)
        layers = self._layers(graph)
        chosen = self._decide(graph, layers)
        work = graph.copy()
        projection = Projection()
        records: list[dict[str, Any]] = []
        if chosen:
            plan = plan_rewrite(graph, [(layer, layer.solutions[g]) for layer, g in chosen], fold=self.fold)
            projection = _projection(graph, plan)
            apply_rewrite(graph, work, plan)
            records = _records(plan)
        gathers = sum(r["gathers"] for r in records)
        logger.info("group-convs: %d convs grouped, %d channel gathers", len(records), gathers)
        return PassResult(work, bool(records), graph, projection, records)

    # ---------------------------------------------------------------- layers
    def _layers(self, graph: Graph) -> list[_Layer]:
        """Eligible convs with their candidate group counts and block solutions."""
        ignore, shared = resolve_names(graph, self.ignore), _shared_keys(graph)
        out = []
        for node in graph.nodes:
            why = _why_not_eligible(graph, node, ignore, shared)
            if why is not None:
                if node.kind == "conv":
                    logger.debug("group-convs: %s not grouped: %s", node, why)
                continue
            F, C = graph.param(node.params["weight"]).shape[:2]
            candidates = self._candidates(F, C)
            if len(candidates) < 2:
                logger.debug("group-convs: %s not grouped: no group count divides %d and %d", node, F, C)
                continue
            layer = self._layer(graph, node)
            layer.candidates = candidates
            self._solve(layer)
            if len(layer.candidates) > 1:
                out.append(layer)
        return out

    def _layer(self, graph: Graph, node: Node) -> _Layer:
        key = node.params["weight"]
        w = graph.param(key).astype(np.float64)
        grad = None
        given = None
        if self.criterion == "taylor" and self.scores is not None:
            if key not in self.scores:
                raise PassOptionError(f"{self.name}: criterion=taylor has no scores for `{key}` ({node})")
            given = np.abs(as_numpy(self.scores[key]).astype(np.float64))
            if given.shape != w.shape[:2]:
                raise PassOptionError(f"{self.name}: scores for `{key}` have shape {given.shape}, expected {w.shape[:2]}")
        elif self.criterion == "taylor":
            if key not in self.gradients:  # type: ignore[operator]
                raise PassOptionError(f"{self.name}: criterion=taylor has no gradient for `{key}` ({node})")
            grad = as_numpy(self.gradients[key]).astype(np.float64)  # type: ignore[index]
        bias_key = node.params.get("bias")
        magnitude = blockperm.pair_scores(w, "l2")
        if given is not None:
            scores = given
        else:
            scores = magnitude if self.criterion == "l2" else blockperm.pair_scores(w, self.criterion, grad)
        return _Layer(
            node, key, bias_key, w.shape[0], w.shape[1], node_macs(graph, node), int(w.size),
            int(graph.param(bias_key).size) if bias_key else 0,
            blockperm.normalise(scores), magnitude,
        )

    def _candidates(self, filters: int, channels: int) -> list[int]:
        """Group counts to consider, ascending with 1 first: ``groups`` if it divides both,
        else the common divisors up to ``max_groups`` leaving ``min_channels_per_group``."""
        divisors = _common_divisors(filters, channels)
        if self.groups is not None:
            return [1] + ([self.groups] if self.groups in divisors else [])
        m = self.min_channels_per_group
        return [d for d in divisors if d == 1 or (d <= self.max_groups and channels // d >= m and filters // d >= m)]

    def _solve(self, layer: _Layer) -> None:
        """Block solutions per candidate; with ``lossless`` only the exactly lossless ones."""
        kept = [1]
        for g in layer.candidates[1:]:
            if self.lossless:
                sol = _lossless_solution(layer, g, self.ns)
                if sol is None:
                    continue
            else:
                sol = blockperm.find_blocks(layer.scores, g, self.ns)
            layer.solutions[g] = sol
            kept.append(g)
        layer.candidates = kept

    # ---------------------------------------------------------------- decide
    def _decide(self, graph: Graph, layers: list[_Layer]) -> list[tuple[_Layer, int]]:
        """The group count per layer (layers staying dense are left out)."""
        if self.budget is not None:
            choice = self._search(graph, layers)
        elif self.groups is not None:
            choice = {layer.node.name: (self.groups if self.groups in layer.candidates else 1) for layer in layers}
        else:  # lossless alone: the largest lossless count
            choice = {layer.node.name: max(layer.candidates) for layer in layers}
        return [(layer, choice[layer.node.name]) for layer in layers if choice[layer.node.name] > 1]

    def _search(self, graph: Graph, layers: list[_Layer]) -> dict[str, int]:
        unit = self.budget_unit
        names = {layer.node.name for layer in layers}
        kinds = ("conv",) if unit == "latency" else ("conv", "conv_transpose")
        convs = [n for n in graph.nodes if n.kind in kinds]
        if unit == "latency":
            timer = ConvTimer()
            fixed = sum(timer.node(graph, n) for n in convs if n.name not in names)
            resources = [{g: timer.node(graph, layer.node, g) for g in layer.candidates} for layer in layers]
        else:
            fixed = sum(_node_resource(graph, n, unit) for n in convs if n.name not in names)
            resources = [{g: layer.resource(g, unit) for g in layer.candidates} for layer in layers]
        base = fixed + sum(r[1] for r in resources)
        limit = self.budget * base  # type: ignore[operator]
        costs = [{g: layer.cost(g) for g in layer.candidates} for layer in layers]
        floor = fixed + sum(min(r.values()) for r in resources)
        if floor > limit:
            raise BudgetError(
                f"{self.name}: cannot reach budget={self.budget} of the conv {unit}: with every groupable conv "
                f"at its cheapest group count (max_groups={self.max_groups}, min_channels_per_group="
                f"{self.min_channels_per_group}{', lossless' if self.lossless else ''}) the convs keep "
                f"{floor / base:.3f} ({floor:,.6g} of {base:,.6g}); {fixed:,.6g} of it is in convs that cannot be "
                f"grouped ({len(convs) - len(layers)} of {len(convs)} convs)"
            )
        picks = search_groups(costs, resources, limit - fixed)
        return {layer.node.name: g for layer, g in zip(layers, picks)}


def _node_resource(graph: Graph, node: Node, unit: str) -> float:
    return float(node_macs(graph, node)) if unit == "macs" else float(_conv_params(graph, node))


def _lossless_solution(layer: _Layer, groups: int, ns: int) -> BlockSolution | None:
    """A labelling with exactly zero off-block weight (component packing, then the
    heuristic), scored by the layer's criterion; ``None`` if neither finds one."""
    sol = blockperm.exact_blocks(layer.magnitude, groups)
    if sol is None:
        if np.count_nonzero(layer.magnitude) > layer.magnitude.size // groups:
            return None  # G blocks hold only F*C/G pairs
        sol = blockperm.find_blocks(blockperm.normalise(layer.magnitude), groups, ns)
        if np.any(layer.magnitude[~sol.mask()] != 0):
            return None
    return BlockSolution(groups, sol.rows, sol.cols, blockperm.kept_mass(layer.scores, sol.rows, sol.cols))


class ConvTimer:
    """Measured onnxruntime CPU latency (ms, one thread, median of ``runs``) of single
    convs with a node's input shape, kernel, stride, dilation and pads, cached by
    configuration: the ``budget_unit=latency`` resource."""

    def __init__(self, runs: int = 15) -> None:
        self.runs = runs
        self._cache: dict[tuple, float] = {}

    def node(self, graph: Graph, node: Node, groups: int | None = None) -> float:
        w = graph.param(node.params["weight"])
        g = int(node.attrs.get("groups", 1)) if groups is None else groups
        C = w.shape[1] * int(node.attrs.get("groups", 1))
        key = (tuple(graph.shape(node.inputs[0]) or ()), (w.shape[0], C // g, *w.shape[2:]), g,
               tuple(node.attrs.get("stride", ())), tuple(node.attrs.get("dilation", ())),
               tuple(node.attrs.get("pads", ())), "bias" in node.params)
        if key not in self._cache:
            self._cache[key] = self._measure(*key)
        return self._cache[key]

    def _measure(self, x_shape: tuple, w_shape: tuple, groups: int, stride: tuple, dilation: tuple,
                 pads: tuple, bias: bool) -> float:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        rng = np.random.default_rng(0)
        inits = [numpy_helper.from_array(rng.standard_normal(w_shape).astype(np.float32), "w")]
        if bias:
            inits.append(numpy_helper.from_array(np.zeros(w_shape[0], np.float32), "b"))
        attrs: dict[str, Any] = {"group": groups, "kernel_shape": list(w_shape[2:])}
        for name, value in (("strides", stride), ("dilations", dilation), ("pads", pads)):
            if value:
                attrs[name] = [int(v) for v in value]
        conv = helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["y"], **attrs)
        graph = helper.make_graph([conv], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        x = {"x": rng.standard_normal(x_shape).astype(np.float32)}
        for _ in range(2):
            sess.run(None, x)
        times = []
        for _ in range(self.runs):
            start = time.perf_counter()
            sess.run(None, x)
            times.append(1000.0 * (time.perf_counter() - start))
        return float(np.median(times))


def search_groups(costs: Sequence[Mapping[int, float]], resources: Sequence[Mapping[int, float]], limit: float) -> list[int]:
    """Per layer a group count whose total resource stays within ``limit``.

    Start from each layer's cheapest count (the largest, for parameters and MACs);
    repeatedly take the move of one layer to another count (a smaller one: only those
    lower the cost) with the largest cost decrease per unit of resource spent,
    ``(cost(G) - cost(G')) / (res(G') - res(G))`` (moves that spend nothing first), among
    moves that lower the cost and keep ``sum res <= limit``, checked before the move is
    made.  Stops when no such move is left; every move lowers the total cost, so it ends.
    """
    state = [min(r, key=lambda g, r=r: (r[g], -g)) for r in resources]
    total = sum(r[g] for r, g in zip(resources, state))
    while True:
        best: tuple[bool, float, float, int, int] | None = None
        for i, (c, r) in enumerate(zip(costs, resources)):
            for g in c:
                gain = c[state[i]] - c[g]
                spend = r[g] - r[state[i]]
                if g == state[i] or gain <= 0 or total + spend > limit:
                    continue
                key = (spend <= 0, gain / spend if spend > 0 else gain, -spend, -i, g)
                if best is None or key > best:
                    best = key
        if best is None:
            return state
        i, g = -best[3], best[4]
        total += resources[i][g] - resources[i][state[i]]
        state[i] = g


# ================================================================== rewrite plan
@dataclass
class _Side:
    """One side (input or output) of a grouped conv: the labels it needs contiguous."""

    layer: int
    port: Port
    labels: np.ndarray  # group label per channel of the port
    unit: int  # channels per group on this side


@dataclass
class LayerPlan:
    """How one conv is rewritten: its block solution, the order it reads its input
    channels in (``a_in``, original indices), the order it produces its filters in
    (``tau``), and the gathers on its input and output (``None``: not needed)."""

    layer: _Layer
    solution: BlockSolution
    a_in: np.ndarray
    tau: np.ndarray
    in_gather: np.ndarray | None
    out_gather: np.ndarray | None
    gathers: int = 0


@dataclass
class RewritePlan:
    layers: list[LayerPlan]
    orders: list[tuple[PruningGroup, dict[Port, np.ndarray]]]  # folded group orders


def plan_rewrite(graph: Graph, chosen: Sequence[tuple[_Layer, BlockSolution]], fold: bool = True) -> RewritePlan:
    """Choose one channel order per coupling group and the gathers each conv still needs
    (``fold=False``: keep every group's order; every permutation becomes a gather)."""
    analysis = analyse(graph)
    group_of = {p: g for g in analysis.groups for p in g.ports}
    sides: dict[int, list[_Side]] = {}
    for i, (layer, sol) in enumerate(chosen):
        node, G = layer.node, sol.groups
        for port, labels, unit in ((Port(node.inputs[0], 1), sol.cols, layer.channels // G),
                                   (Port(node.outputs[0], 1), sol.rows, layer.filters // G)):
            group = group_of.get(port)
            if group is not None:
                sides.setdefault(group.id, []).append(_Side(i, port, labels, unit))
    orders: dict[Port, np.ndarray] = {}
    folded = []
    for group in analysis.groups:
        if not fold or group.id not in sides:
            continue
        chosen_orders = _choose_order(group, sides[group.id])
        if chosen_orders is not None:
            folded.append((group, chosen_orders))
            orders.update(chosen_orders)
    plans = []
    for layer, sol in chosen:
        node = layer.node
        sigma_in = orders.get(Port(node.inputs[0], 1), np.arange(layer.channels))
        sigma_out = orders.get(Port(node.outputs[0], 1), np.arange(layer.filters))
        plans.append(_layer_plan(layer, sol, sigma_in, sigma_out))
    return RewritePlan(plans, folded)


def _choose_order(group: PruningGroup, sides: list[_Side]) -> dict[Port, np.ndarray] | None:
    """The order of ``group`` that meets most of its grouped convs' sides (in their
    canonical label order first, then in any order), ``None`` for the identity (preferred
    on ties).  Frozen groups keep their order."""
    if group.frozen.any():
        return None
    natural = _natural_rank(group)
    links = _group_links(group)
    identity = {p: np.arange(group.sizes[p]) for p in group.ports}
    best_orders, best_score = None, _score(identity, sides)
    for side in sides:
        ranks = _request_ranks(group, natural, side)
        if ranks is None:
            continue
        orders = {p: np.argsort(ranks[group.class_of[p]], kind="stable") for p in group.ports}
        if not _consistent(orders, links):
            continue
        score = _score(orders, sides)
        if score > best_score:
            best_orders, best_score = orders, score
    if best_orders is None:
        return None
    return {p: o for p, o in best_orders.items() if not np.array_equal(o, identity[p])}


def _score(orders: Mapping[Port, np.ndarray], sides: list[_Side]) -> tuple[int, int]:
    """(sides met in canonical label order, sides met in some order)."""
    canonical = contiguous = 0
    for side in sides:
        seq = label_chunks(side.labels[orders[side.port]], side.unit)
        if seq is not None:
            contiguous += 1
            canonical += seq == tuple(range(len(seq)))
    return canonical, contiguous


def label_chunks(labels: np.ndarray, unit: int) -> tuple[int, ...] | None:
    """The label of each run of ``unit`` channels if every run holds one label (and the
    runs have distinct labels), else ``None``."""
    runs = labels.reshape(-1, unit)
    if not np.all(runs == runs[:, :1]):
        return None
    seq = tuple(int(v) for v in runs[:, 0])
    return seq if len(set(seq)) == len(seq) else None


def _natural_rank(group: PruningGroup) -> np.ndarray:
    """A rank per channel class that reproduces the current order: the first position of
    the class on the port that holds the most classes (classes not on it go last)."""
    widest = max(group.ports, key=lambda p: (len(np.unique(group.class_of[p])), -group.ports.index(p)))
    cls = group.class_of[widest]
    rank = np.full(group.n_classes, float(len(cls))) + np.arange(group.n_classes)
    first = np.full(group.n_classes, np.inf)
    np.minimum.at(first, cls, np.arange(len(cls), dtype=float))
    seen = np.isfinite(first)
    rank[seen] = first[seen]
    return rank


def _request_ranks(group: PruningGroup, natural: np.ndarray, side: _Side) -> np.ndarray | None:
    """Class ranks that put ``side``'s channels in label order (within the slots its classes
    hold now), or ``None`` when one class spans channels of different labels."""
    cls = group.class_of[side.port]
    pairs = np.unique(np.stack([cls, side.labels]), axis=1)
    if len(np.unique(pairs[0])) != pairs.shape[1]:
        return None
    wanted = cls[blockperm.block_order(side.labels)]
    _, first = np.unique(wanted, return_index=True)
    sequence = wanted[np.sort(first)]
    ranks = natural.copy()
    ranks[sequence] = np.sort(natural[sequence])
    return ranks


def _group_links(group: PruningGroup) -> list[tuple[Port, Port, np.ndarray | None]]:
    out, seen = [], set()
    for members in group.members.values():
        for m in members:
            for link in m.coupling.links:
                key = (link.a, link.b, None if link.map is None else link.map.tobytes())
                if key not in seen:
                    seen.add(key)
                    out.append((link.a, link.b, link.map))
    return out


def _consistent(orders: Mapping[Port, np.ndarray], links: Iterable[tuple[Port, Port, np.ndarray | None]]) -> bool:
    """Every link still holds after reordering: channel ``j`` of the new ``a`` (old
    ``s_a[j]``) must be tied to channel ``map[j]`` of the new ``b`` (old ``s_b[map[j]]``),
    i.e. ``map[s_a] == s_b[map]``."""
    for a, b, m in links:
        sa, sb = orders[a], orders[b]
        if m is None:
            if not np.array_equal(sa, sb):
                return False
        elif not np.array_equal(m[sa], sb[m]):
            return False
    return True


def _layer_plan(layer: _Layer, sol: BlockSolution, sigma_in: np.ndarray, sigma_out: np.ndarray) -> LayerPlan:
    """The conv reads its input in order ``sigma_in`` and its consumers expect ``sigma_out``
    (original indices).  Where the column (row) groups are not contiguous runs in that
    order, or the runs' label sequences differ, a gather reorders the input (output)."""
    G = sol.groups
    cpg, fpg = layer.channels // G, layer.filters // G
    seq_in = label_chunks(sol.cols[sigma_in], cpg)
    seq_out = label_chunks(sol.rows[sigma_out], fpg)
    a_in, tau = sigma_in, sigma_out
    in_gather = out_gather = None
    if seq_in is not None and seq_in == seq_out:
        pass
    elif seq_out is not None:
        a_in = _grouped(sigma_in, sol.cols, seq_out)
        in_gather = _inverse(sigma_in)[a_in]
    elif seq_in is not None:
        tau = _grouped(sigma_out, sol.rows, seq_in)
        out_gather = _inverse(tau)[sigma_out]
    else:
        seq = tuple(range(G))
        a_in = _grouped(sigma_in, sol.cols, seq)
        tau = _grouped(sigma_out, sol.rows, seq)
        in_gather = _inverse(sigma_in)[a_in]
        out_gather = _inverse(tau)[sigma_out]
    return LayerPlan(layer, sol, a_in, tau, in_gather, out_gather)


def _grouped(order: np.ndarray, labels: np.ndarray, seq: Sequence[int]) -> np.ndarray:
    """``order`` stably re-sorted so its labels run in the sequence ``seq``."""
    position = np.empty(len(seq), dtype=np.int64)
    position[list(seq)] = np.arange(len(seq))
    return order[np.argsort(position[labels[order]], kind="stable")]


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    return inv


# ======================================================================= rewrite
def grouped_weight(weight: np.ndarray, plan: LayerPlan) -> np.ndarray:
    """``W_new[i, r] = (W * M)[tau[i], a_in[q * C/G + r]]`` with ``q = i // (F/G)``: the
    diagonal blocks of the masked weight in the conv's new filter and channel orders.
    Every entry taken lies inside a block (``M = 1`` there; checked), so it equals ``W``'s."""
    G = plan.solution.groups
    F, C = weight.shape[:2]
    fpg, cpg = F // G, C // G
    tau = np.asarray(plan.tau)
    cols = np.asarray(plan.a_in).reshape(G, cpg)[np.arange(F) // fpg]  # (F, cpg)
    rows_ok = plan.solution.rows[plan.tau][:, None] == plan.solution.cols[cols]
    if not rows_ok.all():
        raise AssertionError(f"{plan.layer.node}: block {int(np.argmin(rows_ok.all(1)))} pairs rows and columns of different groups")
    return weight[tau[:, None], cols]


def _full_mask(weight: np.ndarray, sol: BlockSolution) -> np.ndarray:
    mask = np.asarray(sol.mask(), dtype=weight.dtype)
    return np.broadcast_to(mask.reshape(mask.shape + (1,) * (weight.ndim - 2)), weight.shape).copy()


def _projection(graph: Graph, plan: RewritePlan) -> Projection:
    proj = Projection()
    for lp in plan.layers:
        w = graph.param(lp.layer.weight_key)
        proj.mask(lp.layer.weight_key, _full_mask(w, lp.solution))
    return proj


def apply_rewrite(graph: Graph, work: Graph, plan: RewritePlan) -> None:
    """Fold the group orders, write the grouped weights, insert the gathers, commit."""
    own = {k for lp in plan.layers for k in (lp.layer.weight_key, lp.layer.bias_key) if k}
    for group, orders in plan.orders:
        _fold(work, group, orders, skip=own)
    for lp in plan.layers:
        layer, node = lp.layer, work.node(lp.layer.node.name)
        work.set_param(layer.weight_key, grouped_weight(graph.param(layer.weight_key), lp))
        if layer.bias_key:
            work.set_param(layer.bias_key, graph.param(layer.bias_key)[np.asarray(lp.tau)])
        work.set_attr(node, "groups", lp.solution.groups)
    _insert_gathers(work, plan)
    work.commit()


def _fold(work: Graph, group: PruningGroup, orders: Mapping[Port, np.ndarray], skip: set[str]) -> None:
    """Reorder every parameter slice of ``group`` by its port's new order."""
    reindex_params(work, group, orders, skip=skip)


def _insert_gathers(work: Graph, plan: RewritePlan) -> None:
    """Per value: input gathers for single convs (composed with the value's output
    gather, if any), then the output gather for its remaining consumers."""
    out_gather = {lp.layer.node.outputs[0]: lp for lp in plan.layers if lp.out_gather is not None}
    in_gathers: dict[str, list[LayerPlan]] = {}
    for lp in plan.layers:
        if lp.in_gather is not None:
            in_gathers.setdefault(lp.layer.node.inputs[0], []).append(lp)
    for value in sorted(set(out_gather) | set(in_gathers)):
        producer = out_gather.get(value)
        h = producer.out_gather if producer is not None else None
        taken: set[str] = set()
        for lp in in_gathers.get(value, []):
            index = lp.in_gather if h is None else h[lp.in_gather]
            taken.add(lp.layer.node.name)
            if not np.array_equal(index, np.arange(len(index))):
                work.insert_gather(value, 1, index.tolist(), [work.node(lp.layer.node.name)])
                lp.gathers += 1
        if producer is not None:
            rest = [c for c in work.consumers(value) if c.name not in taken]
            if rest:
                work.insert_gather(value, 1, h.tolist(), rest)  # type: ignore[union-attr]
                producer.gathers += 1


def _records(plan: RewritePlan) -> list[dict[str, Any]]:
    out = []
    for lp in plan.layers:
        layer, sol = lp.layer, lp.solution
        out.append({
            "layer": layer.label,
            "groups": sol.groups,
            "kept": sol.kept,
            "kept_identity": blockperm.kept_mass(layer.scores, *_identity(layer, sol.groups)),
            "gathers": lp.gathers,
            "macs": (layer.macs, layer.macs // sol.groups),
            "params": (layer.weight_params + layer.bias_params, layer.weight_params // sol.groups + layer.bias_params),
        })
    return out


def _identity(layer: _Layer, groups: int) -> tuple[np.ndarray, np.ndarray]:
    return blockperm.identity_labels(layer.filters, groups), blockperm.identity_labels(layer.channels, groups)


# ============================================================ taylor from data
def taylor_pair_scores(graph: Graph, data: Any, convs: Sequence[Node]) -> dict[str, torch.Tensor]:
    """``{weight key: S (F x C)}`` with ``S_fc = sum_b |sum_taps W_fc * dL_b/dW_fc|`` over the
    calibration batches ``b`` of ``data`` (see
    :func:`graphprune.training.criteria.calibration_batches` for the accepted forms).
    ``L_b`` is the batch-mean cross-entropy of the first output when the batch has labels,
    else the batch mean of the output's squared norm; the graph runs in eval mode (the
    frontend must differentiate: fx).  Under ``torch.distributed`` the scores are averaged
    over ranks, so every rank takes the same decision.  Needs torch."""
    import torch
    import torch.nn.functional as F

    from graphprune.training import distributed
    from graphprune.training.criteria import calibration_batches

    keys = sorted({n.params["weight"] for n in convs})
    scores = {k: torch.zeros(graph.param(k).shape[:2], dtype=torch.float64) for k in keys}

    def loss(outputs: list[torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        out = outputs[0]
        if labels is not None:
            return F.cross_entropy(out.reshape(len(labels), -1), labels)
        return out.pow(2).reshape(out.shape[0], -1).sum(1).mean()

    for batch in calibration_batches(data, graph):
        grads = graph.gradients(batch.inputs, lambda outs, lab=batch.labels: loss(outs, lab), keys)
        for k in keys:
            prod = torch.from_numpy(graph.param(k).astype(np.float64)) * grads[k].double().cpu()
            scores[k] += prod.flatten(2).sum(-1).abs()
    for k in keys:
        distributed.mean_(scores[k])
    return scores


# ============================================================ training-time helper
def accumulate_gradients(
    model: torch.nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """``{qualified weight name: sum over batches of dL/dW}`` for every conv weight of
    ``model``, for ``criterion=taylor`` (``loss_fn(model, batch)`` returns the loss).  Needs torch."""
    import torch

    weights = {f"{name}.weight": m.weight for name, m in model.named_modules()
               if isinstance(m, torch.nn.modules.conv._ConvNd) and m.weight is not None}
    total = {k: torch.zeros_like(w) for k, w in weights.items()}
    for batch in batches:
        model.zero_grad()
        loss_fn(model, batch).backward()
        for k, w in weights.items():
            if w.grad is not None:
                total[k] += w.grad.detach()
    model.zero_grad()
    return total
