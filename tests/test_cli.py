"""The eplb-triton command and the benchmark, run as users run them (subprocesses, exit codes)."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import make_loads

import eplb_triton as eplb


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    code = "import sys; from eplb_triton.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture
def loads_file(tmp_path):
    w = make_loads(4, 16, "skewed", 11)
    path = tmp_path / "loads.json"
    path.write_text(json.dumps({"logical_count": [[0] * 16] + w.tolist()}))
    return path, w


def test_plan_writes_the_api_result(tmp_path, loads_file):
    path, w = loads_file
    out = tmp_path / "plan.json"
    proc = run("plan", "--loads", str(path), "--replicas", "24", "--groups", "4", "--nodes", "2", "--gpus", "8",
               "--backend", "cpu", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "dropped 1 all-zero (dense) layers" in proc.stderr
    assert "balancedness (mean GPU load / max)" in proc.stdout
    assert len([line for line in proc.stdout.splitlines() if line[:5].strip().isdigit()]) == 4
    plan = json.loads(out.read_text())
    phy2log, log2phy, logcnt = eplb.rebalance_experts(w, 24, 4, 2, 8)
    assert plan["phy2log"] == phy2log.tolist()
    assert plan["log2phy"] == log2phy.tolist()
    assert plan["logcnt"] == logcnt.tolist()
    assert plan["config"] == {"replicas": 24, "groups": 4, "nodes": 2, "gpus": 8, "layers": 4, "experts": 16,
                              "policy": "hierarchical"}  # fmt: skip


def test_plan_plot(tmp_path, loads_file):
    pytest.importorskip("matplotlib")
    path, _ = loads_file
    png = tmp_path / "plan.png"
    proc = run("plan", "--loads", str(path), "--replicas", "16", "--groups", "1", "--nodes", "1", "--gpus", "4",
               "--plot", str(png))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["plan", "--loads", "{loads}", "--replicas", "25", "--groups", "4", "--nodes", "2", "--gpus", "8"],
         "num_replicas (25) must be a multiple of num_gpus (8)"),
        (["plan", "--loads", "{tmp}/absent.npy", "--replicas", "24", "--groups", "4", "--nodes", "2", "--gpus", "8"],
         "absent.npy: no such file"),
        (["plan", "--replicas", "24"], "the following arguments are required: --loads"),
        (["plan", "--loads", "{loads}", "--replicas", "x", "--groups", "4", "--nodes", "2", "--gpus", "8"],
         "argument --replicas: invalid int value: 'x'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["bench", "--experts", "12"], "--experts, --replicas, --groups, --nodes and --gpus go together"),
        (["bench", "--experts", "12", "--replicas", "13", "--groups", "1", "--nodes", "1", "--gpus", "4"],
         "num_replicas (13) must be a multiple of num_gpus (4)"),
    ],
)  # fmt: skip
def test_bad_arguments_exit_2_with_one_line(tmp_path, loads_file, args, message):
    args = [a.format(loads=loads_file[0], tmp=tmp_path) for a in args]
    proc = run(*args)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr


def test_bench_smoke(tmp_path, loads_file):
    """A quick benchmark run on the CPU: every file it promises, on a custom configuration."""
    path, _ = loads_file
    out = tmp_path / "bench"
    proc = run("bench", "--experts", "16", "--replicas", "24", "--groups", "4", "--nodes", "2", "--gpus", "8",
               "--layers", "1", "4", "--repeats", "2", "--loads", str(path), "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "results.json").read_text())
    assert result["provenance"]["torch"] == torch.__version__
    rows = result["latency"]
    backends = {"reference", "cpu"} | ({"triton"} if torch.cuda.is_available() else set())
    assert {(r["layers"], r["backend"]) for r in rows} == {(L, b) for L in (1, 4) for b in backends}
    assert all(r["median_ms"] > 0 for r in rows)
    assert (out / "latency.csv").read_text().startswith("model,layers,backend,median_ms")
    (quality,) = result["quality"]  # only the custom deployment fits 16 experts
    assert quality["deployment"] == "custom"
    assert 0 < quality["balancedness_worst"] <= quality["balancedness_mean"] <= quality["bound_mean"] + 1e-9
    assert "custom" in proc.stdout and "no-rebal" in proc.stdout
