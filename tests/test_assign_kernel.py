"""The maximum-overlap assignment kernel (:mod:`eplb_triton.kernels.assign`).

Interpreter runs (``TRITON_INTERPRET=1``, set in conftest.py) compare the kernel with the NumPy
assignment (:func:`eplb_triton.cpu.assign_max_overlap`) exactly, on small problems full of ties,
where the tie rules decide the matching; brute force over all permutations checks optimality
independently. The ahead-of-time compilation for sm_80 and sm_90 (registers, spills) is in
tests/test_compile_targets.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from eplb_triton import cpu
from eplb_triton.kernels.assign import assign
from eplb_triton.launch import MAX_ASSIGN, assign_launch
from eplb_triton.launch import assign_max_overlap as assign_max_overlap_triton


def assign_max_overlap(overlap: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
    """The NumPy assignment, the kernel's oracle."""
    return torch.from_numpy(cpu.assign_max_overlap(overlap.numpy(), None if skip is None else skip.numpy()))


SIZES = [1, 2, 3, 5, 8, 17]


def _random(B: int, n: int, low: int, high: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (B, n, n), generator=g, dtype=torch.int64)


def _check(overlap: torch.Tensor) -> torch.Tensor:
    got = assign_max_overlap_triton(overlap)
    expected = assign_max_overlap(overlap)
    assert got.dtype == torch.int64 and got.shape == expected.shape
    assert torch.equal(got, expected), f"\n{overlap}\nkernel {got}\nreference {expected}"
    n = overlap.shape[1]
    assert torch.equal(got.sort(dim=1).values, torch.arange(n).expand_as(got)), "not a permutation"
    return got


# (low, high) of the random overlaps: mostly ties, a 0/1 matrix, and wide values
VALUES = {"ties0-2": (0, 3), "bits": (0, 2), "wide": (0, 1 << 16)}


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("values", list(VALUES), ids=str)
def test_matches_reference(n, values):
    low, high = VALUES[values]
    B = 3 if n > 8 else 6
    _check(_random(B, n, low, high, seed=1000 * n + high))


@pytest.mark.parametrize("high", [2, 3], ids=lambda h: f"values0-{h - 1}")
def test_many_small_problems_with_ties(high):
    # 0/1/2 gains: many shortest paths of equal length, so every step's first-minimum rule shows
    for n in range(2, 7):
        _check(_random(24, n, 0, high, seed=100 * n + high))


def test_negative_and_large_overlaps():
    # the reference accepts any integer gains; reduced costs stay far below its _INF = 2**40
    _check(_random(3, 6, -3, 3, seed=7))
    _check(_random(3, 6, -(1 << 30), 1 << 30, seed=8))


@pytest.mark.parametrize("n", [1, 4, 17], ids=lambda n: f"n{n}")
def test_all_zero(n):
    # every matching is optimal: the first-minimum rule gives the identity
    got = _check(torch.zeros((2, n, n), dtype=torch.int64))
    assert torch.equal(got, torch.arange(n).expand(2, n))


@pytest.mark.parametrize("n", [2, 5, 17], ids=lambda n: f"n{n}")
def test_identity_like(n):
    g = torch.Generator().manual_seed(n)
    perm = torch.stack([torch.randperm(n, generator=g) for _ in range(3)])
    eye = torch.eye(n, dtype=torch.int64)
    overlap = torch.stack(
        [
            3 * eye,  # the identity
            torch.zeros((n, n), dtype=torch.int64).scatter_(1, perm[0][:, None], 5),  # a permutation
            eye + 1,  # all ones but a stronger diagonal
            # a permutation over a background of ones: each row's unique maximum
            torch.zeros((n, n), dtype=torch.int64).scatter_(1, perm[1][:, None], 2) + (1 - eye),
        ]
    )
    got = _check(overlap)
    assert torch.equal(got[0], torch.arange(n))
    assert torch.equal(got[1], perm[0])
    assert torch.equal(got[2], torch.arange(n))
    assert torch.equal(got[3], perm[1])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5], ids=lambda n: f"n{n}")
def test_optimal_by_brute_force(n):
    overlap = torch.cat([_random(4, n, 0, 3, seed=50 + n), _random(4, n, 0, 20, seed=60 + n)])
    got = assign_max_overlap_triton(overlap)
    perms = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.int64)  # [n!, n]
    rows = torch.arange(n)
    for b in range(overlap.shape[0]):
        best = overlap[b][rows, perms].sum(dim=1).max()  # [n!] totals
        assert overlap[b][rows, got[b]].sum() == best


def test_every_output_written():
    overlap = _random(3, 7, 0, 3, seed=3)
    out = torch.full((3, 7), -1, dtype=torch.int64)
    assign(overlap, torch.zeros(3, dtype=torch.int32), out, assign_launch(3, 7))
    assert (out >= 0).all()
    assert torch.equal(out, assign_max_overlap(overlap))


def test_skipped_problems_get_the_identity():
    # the pipeline skips the layers that keep their placement: their problems are not solved
    overlap = _random(4, 6, 0, 9, seed=11)
    skip = torch.tensor([False, True, False, True])
    got = assign_max_overlap_triton(overlap, skip)
    assert torch.equal(got, assign_max_overlap(overlap, skip))
    assert torch.equal(got[skip], torch.arange(6).expand(2, 6))
    assert torch.equal(got[~skip], assign_max_overlap(overlap[~skip]))
    assert not torch.equal(got[~skip], torch.arange(6).expand(2, 6))


def test_launcher_limits_and_empty():
    assert assign_max_overlap_triton(torch.zeros((0, 3, 3), dtype=torch.int64)).shape == (0, 3)
    assert assign_max_overlap_triton(torch.zeros((2, 0, 0), dtype=torch.int64)).shape == (2, 0)
    ln = assign_launch(5, 144)
    assert ln.grid == (5,) and ln.constexprs == {"N": 144, "BLOCK_N": 256}
    assert assign_launch(1, MAX_ASSIGN).constexprs["BLOCK_N"] == 512  # columns 0 .. 256
    with pytest.raises(ValueError):
        assign_launch(1, MAX_ASSIGN + 1)
