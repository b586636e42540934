"""One-shot GPU validation and timing of the Triton kernels (run by benchmarks/gpu_check.sh).

Sections, each recorded (or its error recorded) without stopping the others:
  1. equality with the CPU path on the real DeepSeek-V3 loads, five deployments of
     ../shared/data/README.md (the CPU path is proved equal to the reference by the CPU tests);
  2. equality on random loads up to E=1024, R=2048, both policies;
  3. CUDA-graph capture and replay of EplbPlanner.plan;
  4. torch.compile(fullgraph=True) of a step calling the planner;
  5. latency (triton.testing.do_bench median) for 1, 8, 58, 128, 512 layers: drop-in API
     (includes its one host sync), planner launch, planner replayed in a CUDA graph; CPU path
     and literal reference on the same loads for comparison;
  6. a num_warps sweep at 58 layers;
  7. online rebalancing: record+dispatch of 58 layers x 8192 tokens x top-8 (checked against the
     torch reference) and a full rebalance step of OnlineBalancer, eager and in a CUDA graph;
  8. methods beyond the greedy (docs/algorithm.md section 10) on the real loads: method="refined",
     relabelled to an old placement, incremental (max_moves = 15% of R) and incremental around a
     lost GPU (section 12.1, where the deployment allows one), each equal to the CPU path; the
     first three timed (drop-in API, and EplbPlanner.plan with old_phy2log, which stays sync-free);
  9. the per-step balanced split (section 11) on steps sampled from the real loads: equal to the
     NumPy path, timed for 58 layers in one launch and in a CUDA graph, and one layer's dispatch;
 10. a training loop's balancer pieces: record, a due plan, sync_replica_grads, and the weight and
     Adam-state moves of a replan (one GPU: in-process).

Writes ``results.json`` and ``summary.txt`` under ``--out``. Installs nothing.

``--smoke`` runs every section at tiny shapes on the CPU through the Triton interpreter (no CUDA
graphs there), to catch mistakes in this script before a GPU lease is spent on it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
import traceback
from functools import partial
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before triton.jit runs, i.e. before the kernels are imported
    import os

    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

import eplb_triton as eplb  # noqa: E402
from eplb_triton import launch  # noqa: E402
from eplb_triton._validation import Config  # noqa: E402
from eplb_triton.bench import median_cpu_s, synthetic_loads  # noqa: E402
from eplb_triton.configs import DEEPSEEK_V3, MODELS  # noqa: E402
from eplb_triton.io import read_loads  # noqa: E402

REAL_CONFIGS = {name: d.args for name, d in DEEPSEEK_V3.items()}  # name: (R, G, N, P)
TIMED = {
    name: (MODELS[name].experts, *MODELS[name].args)
    for name in ("deepseek-v3-prefill-ep32", "deepseek-v3-decode-ep144")
}
GRAPH_SHAPE = (58, 256, 288, 8, 4, 32)  # (L, E, R, G, N, P)
RANDOM_CONFIGS = [  # (L, E, R, G, N, P)
    (16, 1024, 2048, 16, 4, 64),
    (16, 1024, 2048, 1, 1, 128),
    (16, 1024, 1024, 8, 8, 64),
    (16, 384, 448, 12, 3, 64),  # not powers of two
    (16, 128, 160, 8, 5, 32),  # global: 8 % 5 != 0
    (32, 256, 2048, 8, 2, 8),  # many replicas per expert
    (32, 96, 96, 96, 4, 4),  # groups == experts, no redundancy
]


if SMOKE:
    REAL_CONFIGS = {"prefill-EP32": (288, 8, 4, 32)}
    TIMED = {"small-hierarchical": (16, 24, 4, 2, 8), "small-global": (12, 18, 3, 2, 6)}
    GRAPH_SHAPE = (2, 16, 24, 4, 2, 8)
    RANDOM_CONFIGS = [(2, 16, 24, 4, 2, 8), (2, 12, 18, 3, 2, 6)]
DEVICE = "cpu" if SMOKE else "cuda"


def bench(fn) -> float:
    """Median milliseconds: do_bench on the GPU, perf_counter in smoke mode."""
    if SMOKE:
        return median_cpu_s(fn, repeats=2) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, return_mode="median")


def same(a: tuple, b: tuple) -> bool:
    return all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b, strict=True))


class Report:
    def __init__(self, out: Path):
        self.out = out
        self.data: dict = {
            "device": "cpu (smoke: Triton interpreter)" if SMOKE else torch.cuda.get_device_name(0),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "sections": {},
        }
        self.lines: list[str] = [f"{k}: {v}" for k, v in self.data.items() if k != "sections"]

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def section(self, name: str, fn) -> None:
        self.say(f"== {name}")
        t0 = time.perf_counter()
        try:
            result = fn(self)
            # a section whose checks found a mismatch fails without an exception
            self.data["sections"][name] = {"ok": result.get("all_equal", True), "result": result}
        except Exception as exc:
            self.data["sections"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            self.say(f"FAILED: {type(exc).__name__}: {exc}")
            self.say(traceback.format_exc())
        self.say(f"   ({time.perf_counter() - t0:.1f} s)")
        self.save()

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.data, indent=1))
        (self.out / "summary.txt").write_text("\n".join(self.lines) + "\n")


def check_real(rep: Report, data: Path) -> dict:
    files = sorted(data.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no real load files in {data}")
    result = {}
    for f in files:
        w = read_loads(f).weight[:2] if SMOKE else read_loads(f).weight
        for name, (R, G, N, P) in REAL_CONFIGS.items():
            ok = same(
                eplb.rebalance_experts(w.to(DEVICE), R, G, N, P, backend="triton"),
                eplb.rebalance_experts(w, R, G, N, P, backend="cpu"),
            )
            result[f"{f.stem}/{name}"] = ok
            if not ok:
                rep.say(f"MISMATCH {f.stem} {name}")
    rep.say(f"{sum(result.values())}/{len(result)} (file, config) pairs equal to the CPU path")
    return {"cases": result, "all_equal": all(result.values())}


def check_random(rep: Report) -> dict:
    result = {}
    for L, E, R, G, N, P in RANDOM_CONFIGS:
        for seed in range(3):
            w = synthetic_loads(L, E, seed)
            if seed == 2:
                w = torch.floor(w / 4000)  # many ties
            ok = same(
                eplb.rebalance_experts(w.to(DEVICE), R, G, N, P, backend="triton"),
                eplb.rebalance_experts(w, R, G, N, P, backend="cpu"),
            )
            result[f"L{L}-E{E}-R{R}-G{G}-N{N}-P{P}-s{seed}"] = ok
    rep.say(f"{sum(result.values())}/{len(result)} random cases equal to the CPU path")
    for k, v in result.items():
        if not v:
            rep.say(f"MISMATCH {k}")
    return {"cases": result, "all_equal": all(result.values())}


def check_graph(rep: Report) -> dict:
    if SMOKE:
        rep.say("skipped: no CUDA graphs in smoke mode")
        return {"skipped": True}
    L, E, R, G, N, P = GRAPH_SHAPE
    planner = eplb.EplbPlanner(L, E, R, G, N, P, device=DEVICE)
    static_w = torch.zeros(L, E, device=DEVICE)
    graph = graph_of(partial(planner.plan, static_w))
    oks = []
    for seed in range(3):
        w = synthetic_loads(L, E, 100 + seed)
        static_w.copy_(w)
        graph.replay()
        want = eplb.rebalance_experts(w, R, G, N, P, backend="cpu")
        oks.append(same((planner.phy2log, planner.logcnt), (want[0], want[2])))
    rep.say(f"graph replays equal to the CPU path: {oks}")
    return {"replays_equal": oks, "all_equal": all(oks)}


def check_compile(rep: Report) -> dict:
    L, E, R, G, N, P = GRAPH_SHAPE
    planner = eplb.EplbPlanner(L, E, R, G, N, P, device=DEVICE)

    def step(loads: torch.Tensor) -> torch.Tensor:
        phy2log, _, logcnt = planner.plan(loads.float() * 2)
        return phy2log.sum() + logcnt.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if SMOKE else "inductor")
    w = synthetic_loads(L, E, 7).to(DEVICE)
    compiled(w)
    want = eplb.rebalance_experts(w.cpu() * 2, R, G, N, P, backend="cpu")
    ok = same((planner.phy2log, planner.logcnt), (want[0], want[2]))
    rep.say(f"torch.compile(fullgraph=True) step equal to the CPU path: {ok}")
    return {"all_equal": ok}


def time_layers(rep: Report, layer_counts: list[int]) -> dict:
    rows = []
    rep.say(f"{'config':28s} {'L':>4s} {'api_us':>9s} {'plan_us':>9s} {'graph_us':>9s} {'cpu_ms':>8s} {'ref_ms':>8s}")
    for name, (E, R, G, N, P) in TIMED.items():
        for L in layer_counts:
            w_cpu = synthetic_loads(L, E, L).float()  # float32: no conversion inside the timed calls
            w = w_cpu.to(DEVICE)
            api_ms = bench(partial(eplb.rebalance_experts, w, R, G, N, P, backend="triton"))
            planner = eplb.EplbPlanner(L, E, R, G, N, P, device=DEVICE)
            plan_ms = bench(partial(planner.plan, w))
            graph_ms = float("nan") if SMOKE else bench(graph_of(partial(planner.plan, w)).replay)
            cpu_s = median_cpu_s(partial(eplb.rebalance_experts, w_cpu, R, G, N, P, backend="cpu"), 5)
            ref_s = (
                median_cpu_s(partial(eplb.rebalance_experts, w_cpu, R, G, N, P, backend="reference"), repeats=1)
                if L <= 58
                else float("nan")
            )
            row = dict(config=name, layers=L, api_us=api_ms * 1e3, plan_us=plan_ms * 1e3, graph_us=graph_ms * 1e3,
                       cpu_ms=cpu_s * 1e3, reference_ms=ref_s * 1e3)  # fmt: skip
            rows.append(row)
            rep.say(
                f"{name:28s} {L:4d} {row['api_us']:9.1f} {row['plan_us']:9.1f} {row['graph_us']:9.1f} "
                f"{row['cpu_ms']:8.2f} {row['reference_ms']:8.1f}"
            )
    return {"rows": rows}


def sweep_warps(rep: Report) -> dict:
    rows = []
    for name, (E, R, G, N, P) in TIMED.items():
        w = synthetic_loads(2 if SMOKE else 58, E, 0).float().to(DEVICE)
        cfg = Config(w.shape[0], E, R, G, N, P).effective()
        for warps in (1, 2, 4, 8):
            out = launch.rebalance(w, cfg, num_warps=warps)
            ms = bench(partial(launch.rebalance, w, cfg, out=out, num_warps=warps))
            rows.append(dict(config=name, num_warps=warps, kernel_us=ms * 1e3))
            rep.say(f"{name:28s} num_warps={warps}: {ms * 1e3:8.1f} us")
    return {"rows": rows}


def graph_of(fn) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``fn()``, warmed up on a side stream first."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_online(rep: Report) -> dict:
    from eplb_triton import OnlineBalancer
    from eplb_triton.reference import record_dispatch as record_dispatch_reference

    L, E, R, G, N, P = (2, 16, 24, 4, 2, 8) if SMOKE else (58, 256, 288, 8, 4, 32)
    tokens, top_k = (64, 2) if SMOKE else (8192, 8)
    b = OnlineBalancer(L, E, R, G, N, P, window=10, rebalance_interval=10**9, device=DEVICE, backend="triton")
    g = torch.Generator().manual_seed(0)
    probs = torch.distributions.Pareto(1.0, 1.2).sample((E,)).clamp(max=50)
    ids = [torch.multinomial(probs, tokens * top_k, replacement=True, generator=g).view(tokens, top_k).to(DEVICE)
           for _ in range(L)]  # fmt: skip

    def record_all() -> None:
        for layer in range(L):
            b.record(layer, ids[layer])

    # correctness of one layer against the torch reference
    counts = torch.zeros(E, dtype=torch.int32)
    want, _ = record_dispatch_reference(ids[1].cpu(), b.log2phy[1].cpu(), b.logcnt[1].cpu(), counts)
    b.counts.zero_()
    got = b.record(1, ids[1])
    ok = torch.equal(got.cpu(), want) and torch.equal(b.counts[1].cpu(), counts)
    b.counts.zero_()
    result = {"dispatch_equal": ok, "all_equal": ok, "layers": L, "tokens": tokens, "top_k": top_k}
    result["record_eager_us_per_layer"] = bench(record_all) * 1e3 / L
    if not SMOKE:
        result["record_graph_us_per_layer"] = bench(graph_of(record_all).replay) * 1e3 / L
    b.step()
    result["rebalance_eager_us"] = bench(b.rebalance) * 1e3
    if not SMOKE:
        try:
            result["rebalance_graph_us"] = bench(graph_of(b.rebalance).replay) * 1e3
        except Exception as exc:  # reported, not fatal: the eager figure stands
            result["rebalance_graph_error"] = f"{type(exc).__name__}: {exc}"
    for k, v in result.items():
        rep.say(f"{k}: {v}")
    return result


def check_methods(rep: Report, data: Path) -> dict:
    files = sorted(data.glob("*.json"))[:2]
    if len(files) < 2:
        raise FileNotFoundError(f"need two real load files in {data}")
    w0, w1 = (read_loads(f).weight[:2] if SMOKE else read_loads(f).weight for f in files)
    cases, rows = {}, []
    heads = ("refined_ms", "incr_ms", "plan_us", "cpu_refined_ms", "cpu_incr_ms")
    rep.say(f"{'config':22s} " + " ".join(f"{h:>14s}" for h in heads))
    for name, (R, G, N, P) in REAL_CONFIGS.items():
        old = eplb.rebalance_experts(w0, R, G, N, P, backend="cpu")[0]
        k = int(0.15 * R)
        variants = {
            "refined": dict(method="refined"),
            "relabelled": dict(method="refined", old_phy2log=old),
            "incremental": dict(method="refined", old_phy2log=old, max_moves=k),
        }
        lost = [g != 1 for g in range(P)]  # GPU 1 lost: the refill, then the budget (docs/algorithm.md 12.1)
        try:
            eplb.rebalance_experts(w1[:1], R, G, N, P, backend="cpu", active_gpus=lost)
            variants["lost-gpu-incremental"] = dict(method="refined", old_phy2log=old, max_moves=k, active_gpus=lost)
        except ValueError:  # a node left with fewer slots than its experts (hierarchical prefill EP32)
            rep.say(f"{name}: no lost-GPU case (a node would keep too few slots)")
        for label, kw in variants.items():
            gpu_kw = {key: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for key, v in kw.items()}
            ok = same(
                eplb.rebalance_experts(w1.to(DEVICE), R, G, N, P, backend="triton", **gpu_kw),
                eplb.rebalance_experts(w1, R, G, N, P, backend="cpu", **kw),
            )
            cases[f"{name}/{label}"] = ok
            if not ok:
                rep.say(f"MISMATCH {name} {label}")
        w = w1.float().to(DEVICE)
        old_dev = old.to(DEVICE)
        refined_ms = bench(partial(eplb.rebalance_experts, w, R, G, N, P, backend="triton", method="refined"))
        incr_ms = bench(partial(eplb.rebalance_experts, w, R, G, N, P, backend="triton", method="refined",
                                old_phy2log=old_dev, max_moves=k))  # fmt: skip
        planner = eplb.EplbPlanner(w.shape[0], w.shape[1], R, G, N, P, device=DEVICE, method="refined", max_moves=k)
        plan_ms = bench(partial(planner.plan, w, old_dev))
        w_cpu = w1.float()
        cpu_refined = median_cpu_s(
            partial(eplb.rebalance_experts, w_cpu, R, G, N, P, backend="cpu", method="refined"), 3
        )
        cpu_incr = median_cpu_s(partial(eplb.rebalance_experts, w_cpu, R, G, N, P, backend="cpu", method="refined",
                                        old_phy2log=old, max_moves=k), 3)  # fmt: skip
        row = dict(config=name, refined_ms=refined_ms, incremental_ms=incr_ms, planner_plan_us=plan_ms * 1e3,
                   cpu_refined_ms=cpu_refined * 1e3, cpu_incremental_ms=cpu_incr * 1e3)  # fmt: skip
        rows.append(row)
        rep.say(f"{name:22s} {refined_ms:14.3f} {incr_ms:14.3f} {row['planner_plan_us']:14.1f} "
                f"{row['cpu_refined_ms']:14.2f} {row['cpu_incremental_ms']:14.2f}")  # fmt: skip
    rep.say(f"{sum(cases.values())}/{len(cases)} (config, method) cases equal to the CPU path")
    return {"cases": cases, "rows": rows, "all_equal": all(cases.values())}


def check_dispatch(rep: Report, data: Path) -> dict:
    """The per-step balanced split on the device: equal to the NumPy path on steps sampled from the
    real loads, timed for all layers (one launch), captured in a CUDA graph; and one layer's dispatch."""
    from eplb_triton.bench_dispatch import sample_ids
    from eplb_triton.split import balanced_split

    files = sorted(data.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no real load files in {data}")
    w = read_loads(files[0]).weight
    w = w[:2] if SMOKE else w
    tokens = 64 if SMOKE else 8192
    gen = torch.Generator().manual_seed(0)
    ids = sample_ids(w, tokens, 8, gen)  # [L, T, 8]
    L, E = w.shape
    counts = torch.stack([torch.bincount(ids[i].reshape(-1), minlength=E) for i in range(L)])
    cases, rows = {}, []
    for name, (R, G, N, P) in REAL_CONFIGS.items():
        phy2log = eplb.rebalance_experts(w, R, G, N, P, backend="cpu")[0]
        want = torch.from_numpy(balanced_split(counts.numpy(), phy2log.numpy(), P))
        c_dev, p_dev = counts.to(DEVICE), phy2log.to(DEVICE)
        quota, rounds = launch.balanced_split(c_dev, p_dev, P, R - E + 1)
        ok = torch.equal(quota.cpu(), want)
        slots = eplb.dispatch(ids[0].to(DEVICE), p_dev[0], P, num_experts=E, backend="triton")
        ok &= torch.equal(slots.cpu(), eplb.dispatch(ids[0], phy2log[0], P, num_experts=E, backend="cpu"))
        cases[name] = bool(ok)
        split_ms = bench(partial(launch.balanced_split, c_dev, p_dev, P, R - E + 1))
        row = {"config": name, "layers": L, "tokens": tokens, "equal": bool(ok),
               "split_us_per_layer": split_ms * 1e3 / L, "rounds_max": int(rounds.max()),
               "dispatch_one_layer_us": bench(partial(eplb.dispatch, ids[0].to(DEVICE), p_dev[0], P,
                                                      num_experts=E, backend="triton")) * 1e3}  # fmt: skip
        if not SMOKE:
            row["split_graph_us_per_layer"] = (
                bench(graph_of(partial(launch.balanced_split, c_dev, p_dev, P, R - E + 1)).replay) * 1e3 / L
            )
        rows.append(row)
        rep.say(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return {"cases": cases, "rows": rows, "all_equal": all(cases.values())}


def time_training(rep: Report) -> dict:
    """The balancer's per-step pieces of a training loop, on one GPU: record (58 layers), a due plan
    (step), the replica gradient sums (in-process: a rank's own copies) and the weight + Adam state
    moves of a replan (in-process)."""
    L, E, R, G, N, P = (2, 16, 24, 4, 2, 8) if SMOKE else (58, 256, 288, 8, 4, 32)
    dim, hidden = (4, 8) if SMOKE else (1024, 512)
    b = eplb.OnlineBalancer(L, E, R, G, N, P, window=2, rebalance_interval=2, min_gain=0.0, device=DEVICE,
                            initial_phy2log=eplb.initial_placement(L, E, R))  # fmt: skip
    g = torch.Generator().manual_seed(1)
    probs = torch.distributions.Pareto(1.0, 1.2).sample((E,)).clamp(max=50)
    ids = [torch.multinomial(probs, 512 * 8, replacement=True, generator=g).view(512, 8).to(DEVICE)
           for _ in range(L)]  # fmt: skip
    w13 = [torch.nn.Parameter(torch.randn(R, dim, hidden, device=DEVICE)) for _ in range(L)]
    opt = torch.optim.Adam(w13)
    for p in w13:
        p.grad = torch.randn_like(p)
    opt.step()

    def record_all() -> None:
        for layer in range(L):
            b.record(layer, ids[layer])

    result = {"layers": L, "expert_bytes": dim * hidden * 4}
    result["record_us_per_step"] = bench(record_all) * 1e3
    phy_cpu = b.phy2log.cpu().clone()  # (on the CPU .cpu() is the same tensor, which the plan rewrites)
    result["sync_replica_grads_us"] = bench(partial(eplb.sync_replica_grads, w13, phy_cpu)) * 1e3
    record_all()
    b.step()
    record_all()
    t0 = time.perf_counter()
    changed = b.step()
    result["plan_step_ms"] = (time.perf_counter() - t0) * 1e3
    old = phy_cpu
    t0 = time.perf_counter()
    stats = eplb.rearrange_expert_weights(w13, old, b.phy2log, optimizer=opt)
    if not SMOKE:
        torch.cuda.synchronize()
    result["rearrange_ms"] = (time.perf_counter() - t0) * 1e3
    result["replanned"] = bool(changed)
    result["slots_moved"] = stats.local_copies + stats.received
    for k, v in result.items():
        rep.say(f"{k}: {v}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/deepseek-v3-sglang"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2] if SMOKE else [1, 8, 58, 128, 512])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter (see above)")
    args = parser.parse_args(argv)
    if not SMOKE and not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rep = Report(args.out)
    rep.section("real_loads", lambda r: check_real(r, args.data))
    rep.section("random_loads", check_random)
    rep.section("cuda_graph", check_graph)
    rep.section("torch_compile", check_compile)
    rep.section("latency", lambda r: time_layers(r, args.layers))
    rep.section("num_warps", sweep_warps)
    rep.section("online", time_online)
    rep.section("methods", lambda r: check_methods(r, args.data))
    rep.section("dispatch", lambda r: check_dispatch(r, args.data))
    rep.section("training", time_training)
    failed = [k for k, v in rep.data["sections"].items() if not v["ok"]]
    rep.say(f"sections failed: {failed or 'none'}")
    rep.save()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
