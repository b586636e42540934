"""The benchmark's DeepSeek column and comparison (``--deepseek PATH/eplb.py``), its reading of load
files, and the training-loop plot. DeepSeek's module is the user's file, never shipped here: these
tests write small stand-ins that define ``rebalance_experts`` on top of eplb_triton's reference."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import make_loads

from eplb_triton import bench, metrics, rebalance_experts
from eplb_triton.io import Loads, read_loads

ROOT = Path(__file__).resolve().parents[1]

# E = 16 experts, R = 24 slots (3 per GPU) on P = 8 GPUs in N = 2 nodes, G = 4 groups
CUSTOM = ["--experts", "16", "--replicas", "24", "--groups", "4", "--nodes", "2", "--gpus", "8"]

STAND_INS = {
    # DeepSeek's placements exactly (what the published module returns where loads do not tie)
    "same": """
import eplb_triton

def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    return eplb_triton.rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus, backend="reference")
""",
    # another slot order on every GPU of layer 0 (as a different tie order gives): same GPU loads
    "reordered": """
import eplb_triton

def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    phy2log, log2phy, logcnt = eplb_triton.rebalance_experts(
        weight, num_replicas, num_groups, num_nodes, num_gpus, backend="reference")
    phy2log[0] = phy2log[0].view(num_gpus, -1).flip(1).reshape(-1)
    return phy2log, log2phy, logcnt
""",
    # layer 1 planned without looking at the loads: slot q holds expert q % E
    "round-robin": """
import torch
import eplb_triton

def rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus):
    phy2log, log2phy, logcnt = eplb_triton.rebalance_experts(
        weight, num_replicas, num_groups, num_nodes, num_gpus, backend="reference")
    E = weight.shape[1]
    phy2log[1] = torch.arange(num_replicas) % E
    logcnt[1] = torch.bincount(phy2log[1], minlength=E)
    return phy2log, log2phy, logcnt
""",
}


def stand_in(tmp_path: Path, kind: str = "same") -> Path:
    path = tmp_path / f"eplb_{kind}.py"
    path.write_text(STAND_INS[kind])
    return path


@pytest.fixture
def loads_files(tmp_path):
    """The same 4 MoE layers (16 experts) with dense layers at rows 0 and 3, as SGLang JSON and as CSV."""
    w = make_loads(4, 16, "skewed", 3)
    rows = w.tolist()
    rows = [[0] * 16, rows[0], rows[1], [0] * 16, rows[2], rows[3]]
    json_path, csv_path = tmp_path / "loads.json", tmp_path / "loads.csv"
    json_path.write_text(json.dumps({"logical_count": rows}))
    csv_path.write_text("\n".join(",".join(str(int(x)) for x in row) for row in rows) + "\n")
    return [json_path, csv_path], w


def run_bench(capsys, *args) -> tuple[int, str, str]:
    try:
        code = bench.main([str(a) for a in args], prog="eplb-triton bench")
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_deepseek_is_timed_as_a_backend_column(tmp_path, capsys):
    module = stand_in(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = run_bench(capsys, *CUSTOM, "--layers", "1", "3", "--repeats", "1", "--deepseek", module,
                                  "--backends", "cpu", "--out", out)  # fmt: skip
    assert code == 0, err
    result = json.loads((out / "results.json").read_text())
    rows = result["latency"]
    assert {(r["layers"], r["backend"]) for r in rows} == {(L, b) for L in (1, 3) for b in ("deepseek", "cpu")}
    assert all(r["median_ms"] > 0 for r in rows)
    assert all(r["device"] == result["provenance"]["cpu"] for r in rows if r["backend"] == "deepseek")
    digest = hashlib.sha256(module.read_bytes()).hexdigest()
    assert result["provenance"]["deepseek_eplb"] == {
        "path": str(module), "sha256": digest, "commit": "none: matches no published version of eplb.py"
    }  # fmt: skip
    assert result["provenance"]["busy_processes"] == 0 and all(r["busy"] == 0 for r in rows)
    header, first = stdout.splitlines()[:2]
    assert header.split() == ["model", "layers", "deepseek", "ms", "cpu", "ms", "ds/cpu"]
    ds_ms, cpu_ms, ratio = first.split()[2:]
    assert ratio == f"{float(ds_ms) / float(cpu_ms):.1f}x"  # rounding of the printed times aside
    assert "deepseek" in (out / "latency.csv").read_text()


def test_deepseek_gets_the_reference_time_budget(tmp_path, capsys):
    # a budget of 0 s: the first point of each slow backend is timed, the next one is predicted over budget
    code, _, err = run_bench(capsys, *CUSTOM, "--layers", "1", "2", "--repeats", "1", "--reference-budget", "0",
                             "--deepseek", stand_in(tmp_path), "--out", tmp_path / "out")  # fmt: skip
    assert code == 0, err
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["latency"]
    skipped = {(r["layers"], r["backend"]) for r in rows if r["median_ms"] is None}
    assert skipped == {(2, "deepseek"), (2, "reference")}
    assert all(r["note"].startswith("skipped: predicted") for r in rows if r["median_ms"] is None)


def test_a_deepseek_failure_is_a_note_not_a_crash(tmp_path, capsys):
    module = tmp_path / "eplb.py"
    module.write_text("def rebalance_experts(weight, *args):\n    assert weight.shape[0] > 5, 'too few'\n")
    code, _, err = run_bench(capsys, *CUSTOM, "--layers", "1", "--repeats", "1", "--backends", "cpu",
                             "--deepseek", module, "--out", tmp_path / "out")  # fmt: skip
    assert code == 0, err
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["latency"]
    (ds,) = [r for r in rows if r["backend"] == "deepseek"]
    assert ds["median_ms"] is None and ds["note"] == "failed: AssertionError: too few"


@pytest.mark.parametrize(
    "kind, differ_per_file, same_max", [("same", 0, True), ("reordered", 1, True), ("round-robin", 1, False)]
)
def test_deepseek_agreement_on_real_layers(tmp_path, capsys, loads_files, kind, differ_per_file, same_max):
    paths, w = loads_files
    round_robin = torch.arange(24) % 16  # the round-robin stand-in must really be worse on layer 1
    peak_rr = float(metrics.gpu_loads(w[1:2], round_robin[None], torch.bincount(round_robin)[None], 8).max())
    assert peak_rr > float(metrics.lower_bound(w[1:2], 24, 8)[0]) * 1.5
    out = tmp_path / "out"
    args = [*CUSTOM, "--no-latency", "--deepseek", stand_in(tmp_path, kind), "--out", out]
    code, stdout, err = run_bench(capsys, *args, *[a for p in paths for a in ("--loads", p)])
    assert code == 0, err
    (row,) = json.loads((out / "results.json").read_text())["deepseek_agreement"]  # 16 experts: custom only
    assert row == {"deployment": "custom", "policy": "hierarchical", "files": ["loads.json", "loads.csv"],
                   "layers": 8, "differ": 2 * differ_per_file, "differ_share": differ_per_file / 4,
                   "same_max_gpu_load": same_max, "replicas_renumbered": 0}  # fmt: skip
    table = stdout.split("differ: phy2log or logcnt not equal)\n", 1)[1].splitlines()
    assert table[0].split() == ["deployment", "policy", "layers", "differ", "share", "same", "max", "GPU", "load",
                                "same", "phy2log,", "replicas", "renumbered"]  # fmt: skip
    share = f"{differ_per_file / 4:.1%}"
    assert table[1].split()[:5] == ["custom", "hierarchical", "8", str(2 * differ_per_file), share]
    assert table[1].rsplit(maxsplit=1)[0].strip().endswith("yes, every layer" if same_max else "NO")


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "--deepseek {path}: no such file"),
        ("dir", "--deepseek {path}: not a file"),
        ("def balanced_packing(weight, num_packs):\n    pass\n", "defines no rebalance_experts function"),
        ("rebalance_experts = 3\n", "defines no rebalance_experts function"),
        ("def rebalance_experts(:\n", "cannot import it (SyntaxError: "),
        ("import not_a_module_at_all\n", "cannot import it (ModuleNotFoundError: No module named"),
        ("raise RuntimeError('bad\\nmodule')\n", "cannot import it (RuntimeError: bad module)"),
    ],
)  # fmt: skip
def test_a_bad_deepseek_file_is_one_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "eplb.py"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    code, stdout, err = run_bench(capsys, *CUSTOM, "--layers", "1", "--deepseek", path, "--out", tmp_path / "out")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("eplb-triton bench: error: "), err
    assert message.format(path=path) in err, err
    assert not (tmp_path / "out").exists()  # refused before any work


def test_deepseek_option_on_the_command_line(tmp_path):
    code = "import sys; from eplb_triton.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, "bench", "--deepseek", str(tmp_path / "eplb.py")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == f"eplb-triton bench: error: --deepseek {tmp_path / 'eplb.py'}: no such file\n"


def test_every_format_drops_dense_layers_the_same_way(tmp_path, capsys, loads_files):
    paths, w = loads_files
    np.save(tmp_path / "loads.npy", np.loadtxt(paths[1], delimiter=","))
    for path in [*paths, tmp_path / "loads.npy"]:
        loads = read_loads(path)
        assert torch.equal(loads.weight, w.double()), path.name
        assert loads.layers == [1, 2, 4, 5], path.name
        assert loads.notes == ["dropped 2 all-zero (dense) layers: rows [0, 3]"], path.name
    code, _, err = run_bench(capsys, *CUSTOM, "--no-latency", "--loads", paths[0], "--loads", paths[1],
                             "--out", tmp_path / "out")  # fmt: skip
    assert code == 0, err
    quality = json.loads((tmp_path / "out" / "results.json").read_text())["quality"]
    assert [(q["file"], q["layers"]) for q in quality] == [("loads.json", 4), ("loads.csv", 4)]
    assert quality[0] | {"file": ""} == quality[1] | {"file": ""}
    assert err.count("dropped 2 all-zero (dense) layers: rows [0, 3]") == 2


def test_a_file_of_only_dense_layers_is_refused(tmp_path):
    path = tmp_path / "zeros.csv"
    path.write_text("0,0,0\n0,0,0\n")
    with pytest.raises(ValueError, match="zeros.csv: every layer is all zero"):
        read_loads(path)


def test_same_replicas_on_a_gpu_count_as_the_same_load_in_any_slot_order():
    """In float64, 2**53 + 1 + 1 + 0 summed from the left is 2**53, from the right 2**53 + 2."""
    w = torch.tensor([[2.0**53, 1.0, 1.0, 0.0]], dtype=torch.float64)
    loads = Loads(w, Path("w.npy"), layers=[0])
    one_gpu = bench.Deployment("one-gpu", 4, 4, 1, 1, 1, 1)

    def reversed_slots(weight, *args):  # the same replicas on the one GPU, in the opposite slot order
        phy2log, log2phy, logcnt = rebalance_experts(weight, *args, backend="reference")
        return phy2log.flip(1), log2phy, logcnt

    ours = rebalance_experts(w, 4, 1, 1, 1)[0]
    assert metrics.gpu_loads(w, ours, torch.ones(1, 4, dtype=torch.int64), 1) != metrics.gpu_loads(
        w, ours.flip(1), torch.ones(1, 4, dtype=torch.int64), 1
    )
    (row,) = bench.deepseek_agreement([loads], [one_gpu], SimpleNamespace(rebalance_experts=reversed_slots))
    assert row["differ"] == 1 and row["same_max_gpu_load"] is True


def test_methods_report_rows_and_budget_curve(tmp_path, capsys):
    # two load files of 16 experts: "the placement in service" plans for the first, serves the second
    paths = []
    for seed in (1, 2):
        path = tmp_path / f"loads{seed}.json"
        path.write_text(json.dumps({"logical_count": make_loads(3, 16, "skewed", seed).tolist()}))
        paths.append(path)
    out = tmp_path / "out"
    code, stdout, _ = run_bench(capsys, *CUSTOM, "--no-latency", "--methods", "--repeats", "1",
                                "--budget-deployment", "custom", "--loads", paths[0], "--loads", paths[1],
                                "--out", out)  # fmt: skip
    assert code == 0, stdout
    result = json.loads((out / "results.json").read_text())
    refined = [r for r in result["refined"] if r["deployment"] == "custom"]
    assert len(refined) == 2 and all(r["worse_layers"] == 0 for r in refined)
    (inc,) = [r for r in result["incremental"] if r["deployment"] == "custom"]
    assert inc["max_moves"] == int(0.15 * 24) and inc["incremental_moved"] <= inc["max_moves"] / 24
    # recomputed here: the old placement's balancedness on the new loads, and the incremental plan's
    w0, w1 = read_loads(paths[0]).weight, read_loads(paths[1]).weight
    old = rebalance_experts(w0, 24, 4, 2, 8, backend="cpu")[0]
    old_cnt = torch.zeros((3, 16), dtype=torch.int64).scatter_add_(1, old, torch.ones_like(old))
    want = metrics.balancedness(metrics.gpu_loads(w1, old, old_cnt, 8)).mean()
    assert inc["old_on_new_mean"] == pytest.approx(float(want))
    curve = result["budget_curve"]["points"]
    assert (
        curve[0]["max_moves"] == 0 and curve[0]["moved"] == 0 and curve[0]["balancedness"] == pytest.approx(float(want))
    )
    assert all(p["moved"] <= p["max_moves"] / 24 + 1e-12 for p in curve if p["max_moves"] is not None)
    assert (out / "budget_curve.csv").exists() and (out / "budget_curve.png").exists()


def test_busy_processes_run_only_while_timing(tmp_path, capsys):
    # --busy 1: one extra process spins during the sweep, and is gone afterwards
    import multiprocessing

    code, _, err = run_bench(capsys, *CUSTOM, "--layers", "1", "--repeats", "1", "--backends", "cpu", "--busy", "1",
                             "--out", tmp_path / "out")  # fmt: skip
    assert code == 0, err
    assert "timing with 1 busy process(es)" in err
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["provenance"]["busy_processes"] == 1 and all(r["busy"] == 1 for r in result["latency"])
    assert not multiprocessing.active_children()
    seen = []
    with bench.busy_processes(2):
        seen = [p.is_alive() for p in multiprocessing.active_children()]
    assert seen == [True, True] and not multiprocessing.active_children()


def test_deepseek_versions_are_the_published_files():
    # the table names a commit only for the exact bytes of that version; a copy with other bytes says so
    assert len(bench.DEEPSEEK_VERSIONS) == 6 and all(len(k) == 64 for k in bench.DEEPSEEK_VERSIONS)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--no-latency"], "--no-latency needs --loads FILE"),
        (["--no-latency", "--methods"], "--no-latency needs --loads FILE"),
        (["--methods"], "--methods needs --loads FILE"),
        (["--busy", "-1"], "--busy (-1) must be >= 0"),
        (["--vllm-policy", "default.py"], "--vllm-policy goes with --serving"),
    ],
)
def test_options_that_would_do_nothing_exit_2(tmp_path, capsys, args, message):
    code, stdout, err = run_bench(capsys, *CUSTOM, *args, "--out", tmp_path / "out")
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_serving_and_dispatch_reports(tmp_path, capsys, loads_files):
    # the two reports on tiny real-shaped data: every policy row present, the gate and budgets honoured
    from eplb_triton.bench_serving import BUDGETS, serving_report
    from eplb_triton.configs import Deployment
    from eplb_triton.io import read_loads

    paths, w = loads_files
    files = [read_loads(paths[0]), read_loads(paths[1])]
    d = Deployment("custom", 16, 24, 4, 2, 8, 4)
    rows = serving_report(files, [d], log=lambda *_: None)
    policies = {r["policy"] for r in rows}
    assert policies == {"vllm-default", "relabelled", "gated", *(f"max_moves={round(100 * b)}%" for b in BUDGETS)}
    for r in rows:
        if r["policy"].startswith("max_moves="):
            share = float(r["policy"].split("=")[1].rstrip("%")) / 100
            assert r["moved"] <= max(1, round(share * 24)) / 24 + 1e-9
    by = {r["policy"]: r for r in rows}
    assert by["relabelled"]["after"] == pytest.approx(by["vllm-default"]["after"])  # the same plan, relabelled
    assert by["relabelled"]["moved"] <= by["vllm-default"]["moved"]
    code, stdout, err = run_bench(capsys, *CUSTOM, "--no-latency", "--serving", "--loads", paths[0], "--loads",
                                  paths[1], "--out", tmp_path / "out")  # fmt: skip
    assert code == 0, err
    code, _, err = run_bench(capsys, *CUSTOM, "--no-latency", "--serving", "--loads", paths[0], "--out", tmp_path)
    assert code == 2 and "--serving needs two or more --loads" in err


def test_lost_gpu_report(tmp_path, capsys, loads_files):
    from eplb_triton.bench_serving import LOST_BUDGETS, lost_gpu_report
    from eplb_triton.configs import Deployment
    from eplb_triton.io import read_loads

    paths, _ = loads_files
    files = [read_loads(paths[0]), read_loads(paths[1])]
    for d in (Deployment("custom", 16, 24, 4, 2, 8, 4), Deployment("custom-global", 16, 24, 1, 1, 8, 4)):
        rows = lost_gpu_report(files, [d], log=lambda *_: None)
        by = {r["policy"]: r for r in rows}
        assert set(by) == {"relabelled", "forced only", *(f"max_moves={round(100 * b)}%" for b in LOST_BUDGETS)}
        live = 24 - 3  # one GPU of three slots lost
        for b in LOST_BUDGETS:
            r = by[f"max_moves={round(100 * b)}%"]
            assert r["moved"] <= by["forced only"]["moved"] + max(1, round(b * 24)) / live + 1e-9
            assert r["after"] >= by["forced only"]["after"] - 1e-12
        assert by["forced only"]["moved"] < by["relabelled"]["moved"]
    code, stdout, err = run_bench(capsys, *CUSTOM, "--no-latency", "--lost-gpu", "--loads", paths[0], "--loads",
                                  paths[1], "--out", tmp_path / "out")  # fmt: skip
    assert code == 0, err
    code, _, err = run_bench(capsys, *CUSTOM, "--no-latency", "--lost-gpu", "--loads", paths[0], "--out", tmp_path)
    assert code == 2 and "--lost-gpu needs two or more --loads" in err


def test_dispatch_report_on_small_loads(loads_files):
    from eplb_triton.bench_dispatch import dispatch_report
    from eplb_triton.configs import Deployment
    from eplb_triton.io import read_loads

    paths, _ = loads_files
    d = Deployment("prefill-custom", 16, 24, 4, 2, 8, 4)
    rows = dispatch_report([read_loads(paths[0])], [d], batches=[64, 8192], top_k=2, repeats=1, log=lambda *_: None)
    assert [r["tokens"] for r in rows] == [64, 8192]
    for r in rows:
        assert r["layers_at_optimum"] == 1.0, "the balanced split is the integral optimum on every layer"
        assert r["even"] <= r["balanced"] + 1e-12 and r["balanced"] <= r["optimum"] + 1e-12
    assert "split_ms_per_layer" in rows[1] and "split_ms_per_layer" not in rows[0]
