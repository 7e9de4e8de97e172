"""blockperm: pair scores, the block heuristic, exact blocks and the optimal assignment."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from graphprune import blockperm as bp

pytestmark = pytest.mark.notorch  # numpy only: also run by `make test-notorch`


def planted(rng: np.random.Generator, F: int, C: int, G: int, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores that are block diagonal under hidden row/column permutations: (S, rows, cols)."""
    rows = np.repeat(np.arange(G), F // G)[rng.permutation(F)]
    cols = np.repeat(np.arange(G), C // G)[rng.permutation(C)]
    S = rng.random((F, C)) * (rows[:, None] == cols[None, :]) + noise * rng.random((F, C))
    return bp.normalise(S), rows, cols


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Do two labellings split the indices into the same sets?"""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def assert_balanced(sol: bp.BlockSolution, F: int, C: int) -> None:
    G = sol.groups
    assert np.array_equal(np.bincount(sol.rows, minlength=G), np.full(G, F // G))
    assert np.array_equal(np.bincount(sol.cols, minlength=G), np.full(G, C // G))


# ------------------------------------------------------------------ scores
def test_pair_scores_criteria() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 6, 3, 3))
    g = rng.normal(size=w.shape)
    np.testing.assert_allclose(bp.pair_scores(w, "l2")[1, 2], np.linalg.norm(w[1, 2]))
    np.testing.assert_allclose(bp.pair_scores(w, "l1")[3, 5], np.abs(w[3, 5]).sum())
    np.testing.assert_allclose(bp.pair_scores(w, "taylor", g)[0, 1], abs((w[0, 1] * g[0, 1]).sum()))
    assert bp.pair_scores(w).shape == (4, 6)
    assert bp.normalise(bp.pair_scores(w)).sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="gradient"):
        bp.pair_scores(w, "taylor")
    with pytest.raises(ValueError, match="unknown criterion"):
        bp.pair_scores(w, "l7")


def test_groups_must_divide() -> None:
    with pytest.raises(ValueError, match="divide"):
        bp.heuristic_blocks(np.ones((6, 8)), 4)


# -------------------------------------------------------------- assignment
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_optimal_assignment_matches_brute_force(n: int) -> None:
    rng = np.random.default_rng(n)
    for trial in range(20):
        a = rng.normal(size=(n, n)) if trial % 2 else rng.integers(0, 3, size=(n, n)).astype(float)
        for maximize in (False, True):
            got = bp.optimal_assignment(a, maximize=maximize)
            assert sorted(got.tolist()) == list(range(n))
            value = a[np.arange(n), got].sum()
            sums = [a[np.arange(n), list(p)].sum() for p in itertools.permutations(range(n))]
            assert value == pytest.approx(max(sums) if maximize else min(sums))


def test_optimal_assignment_large_is_a_permutation() -> None:
    a = np.random.default_rng(0).random((64, 64))
    got = bp.optimal_assignment(a, maximize=True)
    assert sorted(got.tolist()) == list(range(64))
    assert a[np.arange(64), got].sum() >= np.trace(a)


# ------------------------------------------------------------------ blocks
def test_block_sums_and_kept_mass_agree() -> None:
    rng = np.random.default_rng(1)
    S = bp.normalise(rng.random((12, 8)))
    sol = bp.heuristic_blocks(S, 4)
    B = bp.block_sums(S, sol.rows, sol.cols, 4)
    assert B.sum() == pytest.approx(1.0)
    assert np.trace(B) == pytest.approx(sol.kept)
    assert S[sol.mask()].sum() == pytest.approx(sol.kept)


def test_block_order_makes_blocks_diagonal() -> None:
    rng = np.random.default_rng(2)
    S, _, _ = planted(rng, 16, 8, 4)
    sol = bp.heuristic_blocks(S, 4)
    permuted = sol.mask()[sol.perm_out()][:, sol.perm_in()]
    expected = np.kron(np.eye(4, dtype=bool), np.ones((4, 2), dtype=bool))
    assert np.array_equal(permuted, expected)


@pytest.mark.parametrize("G", [2, 4, 8, 16])
def test_planted_blocks_are_recovered(G: int) -> None:
    rng = np.random.default_rng(G)
    for _ in range(15):
        F, C = G * int(rng.integers(1, 9)), G * int(rng.integers(1, 9))
        S, rows, cols = planted(rng, F, C, G)
        sol = bp.heuristic_blocks(S, G, ns=10)
        assert sol.kept == pytest.approx(1.0, abs=1e-12)
        assert_balanced(sol, F, C)
        assert same_partition(sol.rows, rows) and same_partition(sol.cols, cols)
        assert bp.identity_blocks(S, G).kept < 1.0 - 1e-6 or G == 1


def test_planted_blocks_under_noise_keep_the_planted_mass() -> None:
    rng = np.random.default_rng(3)
    S, rows, cols = planted(rng, 64, 32, 8, noise=1e-3)
    sol = bp.heuristic_blocks(S, 8)
    assert sol.kept >= bp.kept_mass(S, rows, cols) - 1e-12
    assert same_partition(sol.rows, rows) and same_partition(sol.cols, cols)


@pytest.mark.parametrize("G", [2, 4, 8, 16])
def test_heuristic_beats_identity_on_random_scores(G: int) -> None:
    rng = np.random.default_rng(10 + G)
    S = bp.normalise(rng.random((128, 64)))
    ident = bp.identity_blocks(S, G)
    heur = bp.heuristic_blocks(S, G, ns=10)
    assert_balanced(heur, 128, 64)
    assert heur.kept > ident.kept
    assert bp.find_blocks(S, G).kept >= max(heur.kept, ident.kept) - 1e-15


def test_matching_never_lowers_kept_mass() -> None:
    rng = np.random.default_rng(4)
    for G in (2, 4, 8):
        S = bp.normalise(rng.random((32, 48)))
        rows, cols = bp.greedy_blocks(S, G, ns=3)
        before = bp.kept_mass(S, rows, cols)
        after = bp.kept_mass(S, rows, bp.match_blocks(S, rows, cols, G))
        assert after >= before - 1e-15


def test_one_group_keeps_everything() -> None:
    S = bp.normalise(np.random.default_rng(5).random((6, 9)))
    assert bp.find_blocks(S, 1).kept == pytest.approx(1.0)


# ------------------------------------------------------------ exact blocks
def test_exact_blocks_pack_components() -> None:
    rng = np.random.default_rng(6)
    S, rows, cols = planted(rng, 32, 16, 8)
    for G in (2, 4, 8):  # coarser groupings are unions of the planted blocks
        sol = bp.exact_blocks(S, G)
        assert sol is not None and sol.kept == pytest.approx(1.0)
        assert_balanced(sol, 32, 16)
        assert not np.any(S[~sol.mask()])
    assert bp.exact_blocks(S, 16) is None  # finer than the planted blocks
    assert bp.exact_blocks(bp.normalise(rng.random((8, 8))), 2) is None


def test_exact_blocks_with_zero_rows_and_columns() -> None:
    S = np.zeros((4, 4))
    S[0, 1] = S[2, 3] = 1.0
    sol = bp.exact_blocks(S, 2)
    assert sol is not None and not np.any(S[~sol.mask()])
    assert_balanced(sol, 4, 4)


# --------------------------------------------------------------- ResNet-50
@pytest.fixture(scope="module")
def resnet50_scores() -> list[np.ndarray]:
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet50()  # random weights: pretrained ones cannot be downloaded here
    return [bp.normalise(bp.pair_scores(m.weight.detach().numpy())) for m in model.modules()
            if isinstance(m, torch.nn.Conv2d) and m.groups == 1]


@pytest.mark.parametrize("G", [2, 4, 8])
def test_heuristic_beats_identity_on_resnet50_convs(resnet50_scores: list[np.ndarray], G: int) -> None:
    layers = [S for S in resnet50_scores if S.shape[0] % G == 0 and S.shape[1] % G == 0]
    assert len(layers) == 52  # every conv but the stem (3 input channels)
    ident = np.array([bp.identity_blocks(S, G).kept for S in layers])
    heur = np.array([bp.heuristic_blocks(S, G).kept for S in layers])
    assert np.all(heur > ident)
    assert heur.mean() > 1.02 * ident.mean()  # random weights: identity keeps ~1/G, a small but clear gain
