"""Shared test helpers: configuration generators, load generators and placement invariants."""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import strategies as st

from eplb_triton.configs import DEEPSEEK_V3

# ../shared/data beside the checkout; EPLB_DATA overrides (benchmarks/gpu_check.sh runs a staged copy)
DATA = Path(
    os.environ.get("EPLB_DATA") or Path(__file__).resolve().parents[1].parent / "shared/data/deepseek-v3-sglang"
)

# The five deployments of ../shared/data/README.md: (name, R, G, N, P).
REAL_CONFIGS = [(name, *d.args) for name, d in DEEPSEEK_V3.items()]

LOAD_KINDS = ("ties", "uniform-int", "skewed", "float", "equal", "zeros", "sparse")


@dataclass(frozen=True)
class Case:
    L: int
    E: int
    R: int
    G: int
    N: int
    P: int
    kind: str = "skewed"
    seed: int = 0

    @property
    def id(self) -> str:
        return f"L{self.L}-E{self.E}-R{self.R}-G{self.G}-N{self.N}-P{self.P}-{self.kind}-s{self.seed}"

    @property
    def hierarchical(self) -> bool:
        return self.G % self.N == 0

    def weight(self) -> torch.Tensor:
        return make_loads(self.L, self.E, self.kind, self.seed)


def make_loads(L: int, E: int, kind: str, seed: int) -> torch.Tensor:
    """Loads of a given character; "ties" and "equal" exercise every tie-breaking rule."""
    rng = np.random.default_rng(seed)
    if kind == "ties":
        w = rng.integers(0, 4, (L, E))
    elif kind == "uniform-int":
        w = rng.integers(0, 10_000, (L, E))
    elif kind == "skewed":  # a few hot experts, like real MoE routing
        w = np.floor(rng.pareto(1.2, (L, E)) * 1000)
    elif kind == "float":
        return torch.from_numpy(rng.random((L, E), dtype=np.float32) * 100)
    elif kind == "equal":
        w = np.full((L, E), 7)
    elif kind == "zeros":
        w = np.zeros((L, E))
    elif kind == "sparse":  # most experts idle
        w = rng.integers(0, 100, (L, E)) * (rng.random((L, E)) < 0.2)
    else:
        raise ValueError(kind)
    return torch.from_numpy(np.asarray(w, dtype=np.int64))


@st.composite
def cases(draw, max_layers: int = 8, max_experts: int = 48, max_gpus_per_node: int = 4, max_nodes: int = 4) -> Case:
    """Valid configurations of both policies, with awkward sizes (one GPU, groups == experts, ...)."""
    N = draw(st.integers(1, max_nodes))
    if N > 1 and draw(st.booleans()):  # global policy: G not a multiple of N
        G = draw(st.integers(1, 3 * N).filter(lambda g: g % N != 0))
    else:
        G = N * draw(st.integers(1, 3))
    gs = draw(st.integers(1, max(1, max_experts // G)))
    E = G * gs
    P = N * draw(st.integers(1, max_gpus_per_node))
    s_min = math.ceil(E / P)
    R = P * draw(st.integers(s_min, s_min + 3))
    L = draw(st.integers(1, max_layers))
    return Case(L, E, R, G, N, P, draw(st.sampled_from(LOAD_KINDS)), draw(st.integers(0, 2**31 - 1)))


# Hand-picked awkward configurations, named in the test ids.
FIXED_CASES = [
    Case(2, 12, 16, 4, 2, 8, "uniform-int"),  # the README shape
    Case(1, 1, 1, 1, 1, 1, "skewed"),  # a single expert on a single GPU
    Case(3, 6, 6, 2, 2, 2, "ties"),  # no redundancy
    Case(2, 8, 16, 8, 2, 4, "ties"),  # groups == experts
    Case(2, 8, 12, 4, 1, 1, "skewed"),  # one GPU
    Case(3, 9, 12, 3, 2, 4, "skewed"),  # global policy: 3 % 2 != 0
    Case(2, 10, 15, 5, 1, 5, "equal"),  # all loads equal, odd sizes
    Case(2, 12, 24, 6, 3, 6, "zeros"),  # all loads zero
    Case(4, 16, 32, 4, 4, 8, "sparse"),
    Case(1, 7, 21, 7, 7, 7, "skewed"),  # one group per node, one GPU per node
    Case(2, 16, 20, 2, 1, 4, "float"),
    Case(3, 15, 30, 5, 5, 10, "ties"),
]


def assert_valid_placement(phy2log, log2phy, logcnt, E: int, R: int, G: int, N: int, P: int) -> None:
    """Invariants of a placement (docs/algorithm.md) (independent of how it was computed)."""
    L = phy2log.shape[0]
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert phy2log.shape == (L, R) and logcnt.shape == (L, E) and log2phy.shape[:2] == (L, E)
    assert ((phy2log >= 0) & (phy2log < E)).all()
    assert (logcnt >= 1).all(), "every expert has at least one replica"
    assert (logcnt.sum(dim=1) == R).all(), "replica counts sum to R"
    counted = torch.zeros(L, E, dtype=torch.int64).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    assert torch.equal(counted, logcnt), "logcnt counts the slots of phy2log"
    if L:
        assert log2phy.shape[2] == int(logcnt.max()), "log2phy is trimmed to X = max(logcnt)"
    # log2phy is the inverse of phy2log: every slot once, -1 past each count.
    X = log2phy.shape[2]
    valid = torch.arange(X) < logcnt.unsqueeze(-1)
    assert (log2phy[~valid] == -1).all()
    slots = log2phy[valid].view(-1)
    owners = torch.arange(E).view(1, E, 1).expand(L, E, X)[valid]
    layers = torch.arange(L).view(L, 1, 1).expand(L, E, X)[valid]
    assert torch.equal(phy2log[layers, slots], owners)
    seen = torch.zeros(L, R, dtype=torch.int64).index_put_((layers, slots), torch.ones_like(slots), accumulate=True)
    assert (seen == 1).all(), "every slot appears exactly once in log2phy"
    if G % N == 0:  # hierarchical: a group's experts (all replicas) stay on one node
        node_of_slot = (torch.arange(R) // (R // N)).expand(L, R)
        node_min = torch.full((L, G), N, dtype=torch.int64).scatter_reduce(1, phy2log // (E // G), node_of_slot, "amin")
        node_max = torch.full((L, G), -1, dtype=torch.int64).scatter_reduce(
            1, phy2log // (E // G), node_of_slot, "amax"
        )
        assert torch.equal(node_min, node_max), "a group's experts stay on one node"


def assert_same(got, want, names=("out0", "out1", "out2")) -> None:
    """Exact equality of two output tuples (integer outputs never compare with tolerances)."""
    assert len(got) == len(want)
    for name, a, b in zip(names, got, want, strict=False):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{b.shape}"
        assert torch.equal(a.cpu(), b.cpu()), f"{name} differs"


# A rank left waiting for a peer that never comes fails the test after this long instead of hanging it.
TIMEOUT = timedelta(seconds=30)


def load_script(name: str):
    """``benchmarks/<name>.py`` as a module, registered in ``sys.modules`` under ``name`` (dataclasses
    look their module up while it runs; ``budget_bound`` imports ``pairing_lp`` by that name)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, fn, *args) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` processes joined in a gloo process group (the
    world group, on loopback); a process's exception fails the call. ``fn`` must be importable
    (a module-level function of a test module)."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
    # Success: leave without interpreter finalization. torch 2.13's gloo worker threads can still be
    # dropping their last reference to a finished collective's tensors (which takes the GIL) when the
    # interpreter shuts down; that thread is then unwound through a noexcept destructor and the
    # process aborts (SIGABRT, "terminate called without an active exception"), failing a rank that
    # did all its work. Seen in about 1 of 5 runs of test_train_ep; pytorch/pytorch PR 179291.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
