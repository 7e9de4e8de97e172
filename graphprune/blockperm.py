"""Block-diagonal channel permutations for group convolution (Zhao & Luk, "Efficient
Structured Pruning and Architecture Searching for Group Convolution").  Pure numpy.

Scores.  A conv weight ``W`` has shape ``(F, C, k...)``.  Its *pair score* matrix ``S``
(``F x C``) holds one non-negative score per (filter, input channel) pair:

* ``l2``:     ``S_fc = ||W_fc||_2`` (the kernel slice ``W[f, c]``),
* ``l1``:     ``S_fc = ||W_fc||_1``,
* ``taylor``: ``S_fc = |<W_fc, dL/dW_fc>|``, the first-order Taylor estimate of the loss
  change when the slice is removed (needs the accumulated gradient),

normalised so that ``sum S = 1``.

Blocks.  ``G`` groups are a row labelling ``r: {0..F-1} -> {0..G-1}`` and a column
labelling ``c: {0..C-1} -> {0..G-1}`` with ``F/G`` rows and ``C/G`` columns per label.
Sorting rows and columns by label (the permutations ``perm_out``, ``perm_in``) turns
the kept pairs ``{(f, j): r(f) = c(j)}`` into ``G`` diagonal blocks.  The *kept mass* is

    kept(r, c) = sum_{f, j : r(f) = c(j)} S_fj,

and the cost of ``G`` groups is ``1 - kept``, the score mass pruned.  Without
permutation (``r(f) = f // (F/G)``, ``c(j) = j // (C/G)``) a random layer keeps ``~1/G``.

Heuristic (:func:`heuristic_blocks`).  Blocks are built greedily from the bottom-right:
for block ``g = G-1, ..., 1``, ``N_S`` times, the unassigned columns are sorted
(ascending, stably) by their mass in the block's rows and the last ``C/G`` become the
block's columns, then the unassigned rows are sorted by their mass in those columns and
the last ``F/G`` become its rows.  The first sort is seeded by one row, the unassigned
row of largest mass (seeding by an arbitrary set of rows lets the alternation settle on
a mixture of two blocks).  The block is then fixed and removed; block 0 takes what is
left.  Finally row blocks are matched to column blocks by an optimal
assignment on the ``G x G`` block sums ``B_gh = sum_{r(f)=g, c(j)=h} S_fj``
(:func:`optimal_assignment`, Hungarian method), which can only raise the kept mass.

Exact blocks (:func:`exact_blocks`).  When the off-block weight is exactly zero the
bipartite graph of non-zero pairs splits into connected components; packing them into
``G`` bins of exactly ``F/G`` rows and ``C/G`` columns gives a lossless labelling.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

CRITERIA = ("l2", "l1", "taylor")


# ------------------------------------------------------------------ scores
def pair_scores(weight: np.ndarray, criterion: str = "l2", grad: np.ndarray | None = None) -> np.ndarray:
    """The ``F x C`` pair score matrix of a conv weight ``(F, C, k...)`` (not normalised)."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim < 2:
        raise ValueError(f"a conv weight needs at least 2 axes, got shape {w.shape}")
    flat = w.reshape(w.shape[0], w.shape[1], -1)
    if criterion == "l2":
        return np.sqrt(np.square(flat).sum(-1))
    if criterion == "l1":
        return np.abs(flat).sum(-1)
    if criterion == "taylor":
        if grad is None:
            raise ValueError("the taylor criterion needs the weight's gradient")
        g = np.asarray(grad, dtype=np.float64).reshape(flat.shape)
        return np.abs((flat * g).sum(-1))
    raise ValueError(f"unknown criterion `{criterion}` (known: {', '.join(CRITERIA)})")


def normalise(scores: np.ndarray) -> np.ndarray:
    """``S / sum S`` (an all-zero matrix becomes uniform: every labelling costs alike)."""
    total = float(scores.sum())
    if total <= 0.0:
        return np.full(scores.shape, 1.0 / scores.size)
    return scores / total


# ------------------------------------------------------------------ blocks
@dataclass
class BlockSolution:
    """A labelling of rows (filters) and columns (input channels) into ``groups`` blocks."""

    groups: int
    rows: np.ndarray  # (F,) label per filter
    cols: np.ndarray  # (C,) label per input channel
    kept: float  # kept score mass (of normalised scores)

    def mask(self) -> np.ndarray:
        """Boolean ``F x C`` mask of kept pairs, in the original (unpermuted) layout."""
        return block_mask(self.rows, self.cols)

    def perm_out(self) -> np.ndarray:
        return block_order(self.rows)

    def perm_in(self) -> np.ndarray:
        return block_order(self.cols)


def block_mask(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``M_fj = [r(f) = c(j)]``."""
    return rows[:, None] == cols[None, :]


def block_order(labels: np.ndarray) -> np.ndarray:
    """The permutation that sorts indices by (label, index): ``new[i] = old[order[i]]``."""
    return np.lexsort((np.arange(len(labels)), labels))


def identity_labels(n: int, groups: int) -> np.ndarray:
    """Contiguous labels ``i // (n / G)``: the grouping without permutation."""
    return np.arange(n) // (n // groups)


def block_sums(scores: np.ndarray, rows: np.ndarray, cols: np.ndarray, groups: int) -> np.ndarray:
    """``B_gh = sum_{r(f) = g, c(j) = h} S_fj`` (``G x G``)."""
    index = (rows[:, None] * groups + cols[None, :]).ravel()
    return np.bincount(index, weights=scores.ravel(), minlength=groups * groups).reshape(groups, groups)


def kept_mass(scores: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> float:
    """``sum_{r(f) = c(j)} S_fj``."""
    return float(scores[block_mask(rows, cols)].sum())


def _check(scores: np.ndarray, groups: int) -> tuple[int, int]:
    F, C = scores.shape
    if groups < 1 or F % groups or C % groups:
        raise ValueError(f"{groups} groups must divide both {F} filters and {C} input channels")
    return F // groups, C // groups


def identity_blocks(scores: np.ndarray, groups: int) -> BlockSolution:
    """The grouping with no permutation."""
    _check(scores, groups)
    F, C = scores.shape
    rows, cols = identity_labels(F, groups), identity_labels(C, groups)
    return BlockSolution(groups, rows, cols, kept_mass(scores, rows, cols))


def greedy_blocks(scores: np.ndarray, groups: int, ns: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Row and column labels from the bottom-right greedy sort (module doc), unmatched."""
    fpg, cpg = _check(scores, groups)
    F, C = scores.shape
    rows_left, cols_left = np.arange(F), np.arange(C)
    row_lab = np.zeros(F, dtype=np.int64)
    col_lab = np.zeros(C, dtype=np.int64)
    for g in range(groups - 1, 0, -1):
        sub = scores[np.ix_(rows_left, cols_left)]
        block_rows = _seed_rows(sub)
        for _ in range(max(ns, 1)):
            c_order = _sort_by_mass(sub[block_rows].sum(0))
            r_order = _sort_by_mass(sub[:, c_order[-cpg:]].sum(1))
            block_rows = r_order[-fpg:]
        row_lab[rows_left[r_order[-fpg:]]] = g
        col_lab[cols_left[c_order[-cpg:]]] = g
        rows_left, cols_left = rows_left[r_order[:-fpg]], cols_left[c_order[:-cpg]]
    return row_lab, col_lab


def _seed_rows(sub: np.ndarray) -> np.ndarray:
    """The row that starts a block: the unassigned row with the most unassigned mass.
    Seeding with one row (not an arbitrary set of rows) keeps the alternating sorts from
    settling on a mixture of two blocks."""
    return np.array([int(np.argmax(sub.sum(1)))])


def _sort_by_mass(mass: np.ndarray) -> np.ndarray:
    """Indices sorted by ascending mass (stable): the heaviest end up last."""
    return np.argsort(mass, kind="stable")


def match_blocks(scores: np.ndarray, rows: np.ndarray, cols: np.ndarray, groups: int) -> np.ndarray:
    """Relabel column blocks so row block ``g`` meets the column block that maximises the
    total kept mass (optimal assignment on the block sums); returns the new column labels."""
    assign = optimal_assignment(block_sums(scores, rows, cols, groups), maximize=True)
    relabel = np.empty(groups, dtype=np.int64)
    relabel[assign] = np.arange(groups)  # column block assign[g] becomes label g
    return relabel[cols]


def heuristic_blocks(scores: np.ndarray, groups: int, ns: int = 10) -> BlockSolution:
    """Greedy bottom-right blocks, then optimal matching of row and column blocks."""
    rows, cols = greedy_blocks(scores, groups, ns)
    cols = match_blocks(scores, rows, cols, groups)
    return BlockSolution(groups, rows, cols, kept_mass(scores, rows, cols))


def find_blocks(scores: np.ndarray, groups: int, ns: int = 10) -> BlockSolution:
    """An exact labelling when the non-zero pattern allows one (:func:`exact_blocks`),
    else the better of the heuristic and the identity grouping (by kept mass)."""
    if groups == 1:
        F, C = scores.shape
        return BlockSolution(1, np.zeros(F, np.int64), np.zeros(C, np.int64), float(scores.sum()))
    exact = exact_blocks(scores, groups)
    if exact is not None:
        return exact
    best = heuristic_blocks(scores, groups, ns)
    ident = identity_blocks(scores, groups)
    return ident if ident.kept >= best.kept else best


# ------------------------------------------------------------ exact blocks
def exact_blocks(scores: np.ndarray, groups: int) -> BlockSolution | None:
    """A labelling that keeps every non-zero pair, or ``None`` if none is found.

    The non-zero pattern's connected components (rows and columns joined by non-zero
    pairs) must each lie in one block; they are packed first-fit, largest first, into
    ``G`` bins of exactly ``F/G`` rows and ``C/G`` columns.
    """
    fpg, cpg = _check(scores, groups)
    F, C = scores.shape
    row_comp, col_comp = _components(scores != 0)
    comps = np.unique(np.concatenate([row_comp, col_comp]))
    n_rows = np.array([(row_comp == k).sum() for k in comps])
    n_cols = np.array([(col_comp == k).sum() for k in comps])
    order = np.lexsort((comps, -(n_rows * cpg + n_cols * fpg)))
    free_rows = np.full(groups, fpg)
    free_cols = np.full(groups, cpg)
    bin_of = {}
    for i in order:
        fits = np.nonzero((free_rows >= n_rows[i]) & (free_cols >= n_cols[i]))[0]
        if not len(fits):
            return None
        b = int(fits[0])
        free_rows[b] -= n_rows[i]
        free_cols[b] -= n_cols[i]
        bin_of[int(comps[i])] = b
    rows = np.array([bin_of[int(k)] for k in row_comp], dtype=np.int64)
    cols = np.array([bin_of[int(k)] for k in col_comp], dtype=np.int64)
    return BlockSolution(groups, rows, cols, kept_mass(scores, rows, cols))


def _components(nonzero: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the bipartite graph rows-columns with edges at ``nonzero``:
    each row and column gets the smallest node id of its component (rows are ``0..F-1``,
    columns ``F..F+C-1``), by min-label propagation."""
    F, C = nonzero.shape
    big = F + C
    row_lab = np.arange(F)
    col_lab = F + np.arange(C)
    while True:
        via_rows = np.where(nonzero, row_lab[:, None], big).min(0) if F else np.full(C, big)
        new_col = np.minimum(col_lab, via_rows)
        via_cols = np.where(nonzero, new_col[None, :], big).min(1) if C else np.full(F, big)
        new_row = np.minimum(row_lab, via_cols)
        if np.array_equal(new_row, row_lab) and np.array_equal(new_col, col_lab):
            return row_lab, col_lab
        row_lab, col_lab = new_row, new_col


# -------------------------------------------------------------- assignment
def optimal_assignment(cost: np.ndarray, maximize: bool = False) -> np.ndarray:
    """Optimal assignment of a square matrix: ``a`` with ``a[i]`` the column given to row
    ``i``, minimising (or maximising) ``sum_i cost[i, a[i]]``.

    Hungarian method with row and column potentials ``u, v`` (``cost_ij - u_i - v_j >= 0``,
    zero on the matching): rows are added one at a time, each by a shortest augmenting path
    in reduced costs (Dijkstra over columns), then the potentials are updated.  O(n^3).
    """
    a = np.asarray(cost, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"assignment needs a square matrix, got shape {a.shape}")
    if maximize:
        a = -a
    n = a.shape[0]
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    owner = np.zeros(n + 1, dtype=np.int64)  # owner[j]: 1-based row matched to column j (0: free)
    for i in range(1, n + 1):
        _augment(a, i, u, v, owner)
    result = np.empty(n, dtype=np.int64)
    for j in range(1, n + 1):
        result[owner[j] - 1] = j - 1
    return result


def _augment(a: np.ndarray, row: int, u: np.ndarray, v: np.ndarray, owner: np.ndarray) -> None:
    """Add 1-based ``row`` to the matching along a shortest augmenting path (column 0 is a
    virtual start column owned by ``row``)."""
    n = a.shape[0]
    owner[0] = row
    dist = np.full(n + 1, np.inf)
    prev = np.zeros(n + 1, dtype=np.int64)
    done = np.zeros(n + 1, dtype=bool)
    col = 0
    while True:
        done[col] = True
        i = owner[col]
        free = ~done[1:]
        reduced = a[i - 1] - u[i] - v[1:]
        better = free & (reduced < dist[1:])
        dist[1:][better] = reduced[better]
        prev[1:][better] = col
        candidates = np.where(free, dist[1:], np.inf)
        nxt = int(np.argmin(candidates)) + 1
        delta = candidates[nxt - 1]
        u[owner[done]] += delta
        v[done] -= delta
        dist[1:][free] -= delta
        col = nxt
        if owner[col] == 0:
            break
    while col:
        back = prev[col]
        owner[col] = owner[back]
        col = back
