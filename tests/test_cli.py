"""The eplb-triton command and the benchmark, run as users run them (subprocesses, exit codes), and
in-process (``main([...])``) for the failure paths: every user error is one line and exit 2, and a
failure never damages a file that was there before."""

import argparse
import errno
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_loads

import eplb_triton as eplb
from eplb_triton import _atomic, bench, cli, metrics
from eplb_triton.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    code = "import sys; from eplb_triton.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def call(capsys, *args: str) -> tuple[int, str, str]:
    """``main(args)`` in-process: (exit code, stdout, stderr); argparse's exits count as exit codes."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


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
                              "policy": "hierarchical", "method": "greedy", "old": None, "max_moves": None,
                              "min_gain": None, "active_gpus": None}  # fmt: skip


@pytest.mark.parametrize(
    ("groups", "nodes", "label"), [(4, 2, "hierarchical"), (1, 1, "global"), (3, 2, "global"), (4, 1, "hierarchical")]
)
def test_plan_labels_the_policy_that_runs(tmp_path, loads_file, groups, nodes, label):
    # G = N = 1 runs the global pipeline (docs/algorithm.md: global = hierarchical with one group and one node)
    path, w = loads_file
    if w.shape[1] % groups:
        w = w[:, :15]
        path = tmp_path / "loads15.csv"
        path.write_text("\n".join(",".join(str(int(x)) for x in row) for row in w.tolist()))
    out = tmp_path / "plan.json"
    assert main(["plan", "--loads", str(path), "--replicas", "24", "--groups", str(groups), "--nodes", str(nodes),
                 "--gpus", "8", "--backend", "cpu", "--out", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["config"]["policy"] == label


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


def plan_args(loads) -> list[str]:
    return ["plan", "--loads", str(loads), "--replicas", "24", "--groups", "4", "--nodes", "2", "--gpus", "8",
            "--backend", "cpu"]  # fmt: skip


def test_plot_writes_exactly_the_named_file(tmp_path, loads_file, capsys):
    pytest.importorskip("matplotlib")
    path, _ = loads_file
    code, _, err = call(capsys, *plan_args(path), "--out", tmp_path / "plan.json", "--plot", tmp_path / "x.png")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loads.json", "plan.json", "x.png"]  # no temporaries
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "plan.json").read_text())["config"]["replicas"] == 24


def test_previous_out_survives_a_failing_plot(tmp_path, loads_file, capsys):
    pytest.importorskip("matplotlib")
    path, _ = loads_file
    out = tmp_path / "plan.json"
    out.write_bytes(b'{"previous": "plan"}\n')
    code, _, err = call(capsys, *plan_args(path), "--out", out, "--plot", tmp_path / "missing" / "plan.png")
    assert code == 2
    assert err.count("\n") == 1 and "no such folder" in err, err
    assert out.read_bytes() == b'{"previous": "plan"}\n'


def test_failed_write_leaves_previous_files_and_no_temporaries(tmp_path, loads_file, capsys, monkeypatch):
    """A disk that fills up while the new files are written (fsync is where a full disk reports)."""
    pytest.importorskip("matplotlib")
    path, _ = loads_file
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    out.write_bytes(b"old plan")
    png.write_bytes(b"old plot")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_atomic.os, "fsync", full)
    code, _, err = call(capsys, *plan_args(path), "--out", out, "--plot", png)
    assert code == 2
    assert err.count("\n") == 1 and f"cannot write {out}: No space left on device" in err, err
    assert out.read_bytes() == b"old plan" and png.read_bytes() == b"old plot"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loads.json", "plan.json", "plan.png"]


def test_replaced_out_keeps_its_permissions(tmp_path, loads_file, capsys):
    path, _ = loads_file
    out = tmp_path / "plan.json"
    out.write_bytes(b"old plan")
    out.chmod(0o640)
    assert call(capsys, *plan_args(path), "--out", out)[0] == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert json.loads(out.read_text())["config"]["gpus"] == 8
    new = tmp_path / "new.json"  # a new file gets the usual mode, not the 0600 of a temporary file
    umask = os.umask(0o022)
    try:
        assert call(capsys, *plan_args(path), "--out", new)[0] == 0
    finally:
        os.umask(umask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o644


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink", "hardlink"])
def test_out_that_is_the_loads_file_is_refused(tmp_path, loads_file, capsys, spelling):
    path, _ = loads_file
    before = path.read_bytes()
    (tmp_path / "sub").mkdir()
    out = {"same": path, "dotdot": tmp_path / "sub" / ".." / path.name}.get(spelling, tmp_path / "alias.json")
    if spelling == "symlink":
        out.symlink_to(path)
    elif spelling == "hardlink":
        os.link(path, out)
    code, _, err = call(capsys, *plan_args(path), "--out", out)
    assert code == 2
    assert err.count("\n") == 1 and "refusing to overwrite the input" in err, err
    assert path.read_bytes() == before


def test_out_and_plot_that_are_one_file_are_refused(tmp_path, loads_file, capsys):
    path, _ = loads_file
    code, _, err = call(capsys, *plan_args(path), "--out", tmp_path / "a.png", "--plot", tmp_path / "a.png")
    assert code == 2
    assert err.count("\n") == 1 and "are the same file" in err, err
    assert not (tmp_path / "a.png").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top", "-1"], "argument --top: must be a positive integer, got -1"),
        (["--top", "0"], "argument --top: must be a positive integer, got 0"),
        (["--replicas", "0"], "argument --replicas: must be a positive integer, got 0"),
        (["--groups", "-4"], "argument --groups: must be a positive integer, got -4"),
        (["--nodes", "0"], "argument --nodes: must be a positive integer, got 0"),
        (["--gpus", "0"], "argument --gpus: must be a positive integer, got 0"),
        (["--replicas", str(10**30)], "argument --replicas: must be at most 2**63 - 1"),
        (["--replicas", str(10**12)], "num_replicas (1000000000000) must be <= 65536 slots per layer"),
        (["--replicas", str(2**63 - 8)], "num_replicas (9223372036854775800) must be <= 65536 slots per layer"),
        (["--out", "{tmp}"], "--out {tmp}: is a directory"),
        (["--out", "{tmp}/missing/plan.json"], "--out {tmp}/missing/plan.json: no such folder {tmp}/missing"),
        (["--out", "{loads}/plan.json"], "no such folder {loads}"),
        (["--plot", "{tmp}"], "the file name must end in .png"),
        (["--plot", "{tmp}/d.png"], "--plot {tmp}/d.png: is a directory"),
        (["--plot", "{tmp}/missing/plan.png"], "--plot {tmp}/missing/plan.png: no such folder {tmp}/missing"),
        (["--plot", "{tmp}/plan.svg"], "--plot {tmp}/plan.svg: the plot is a PNG, the file name must end in .png"),
        (["--plot", "{tmp}/plan"], "the file name must end in .png"),
        (["--loads", "{tmp}"], "{tmp}: is a directory, not a load file"),
        (["--loads", "{tmp}/sparse.pt"], "{tmp}/sparse.pt: loads must be a dense tensor, got a sparse_coo tensor"),
    ],
)  # fmt: skip
def test_user_errors_exit_2_with_one_line(tmp_path, loads_file, capsys, extra, message):
    path, _ = loads_file
    (tmp_path / "d.png").mkdir()
    torch.save(make_loads(4, 16, "skewed", 1).to_sparse(), tmp_path / "sparse.pt")
    args = plan_args(path)
    for i in range(0, len(extra), 2):  # replace the option if plan_args has it, else add it
        option, value = extra[i], extra[i + 1].format(tmp=tmp_path, loads=path)
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = call(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("eplb-triton") and message.format(tmp=tmp_path, loads=path) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_unwritable_outputs_exit_2_with_one_line(tmp_path, loads_file, capsys):
    probe = tmp_path / "probe"
    probe.touch(mode=0o444)
    if os.access(probe, os.W_OK):
        pytest.skip("file permissions are not enforced here (root)")
    path, _ = loads_file
    locked = tmp_path / "locked"
    locked.mkdir()
    (tmp_path / "readonly.json").write_bytes(b"keep")
    (tmp_path / "readonly.json").chmod(0o444)
    locked.chmod(0o555)
    try:
        for out, message in ((locked / "plan.json", "is not writable"), (tmp_path / "readonly.json", "not writable")):
            code, _, err = call(capsys, *plan_args(path), "--out", out)
            assert code == 2 and err.count("\n") == 1 and message in err, err
        assert (tmp_path / "readonly.json").read_bytes() == b"keep"
    finally:
        locked.chmod(0o755)


def test_huge_replicas_as_a_user_runs_it(tmp_path, loads_file):
    """The real entry point: no traceback, one line, for a plan too large to allocate."""
    args = plan_args(loads_file[0])
    args[args.index("--replicas") + 1] = str(10**12)
    proc = run(*args)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


# --- entry points, help, packaging


def test_version(tmp_path):
    version = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert eplb.__version__ == version
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout == f"eplb-triton {version}\n", proc


def test_python_m_eplb_triton_is_the_command(tmp_path, loads_file):
    def module(*args):
        return subprocess.run([sys.executable, "-m", "eplb_triton", *args], capture_output=True, text=True,
                              timeout=300)  # fmt: skip

    for args in (["--version"], []):
        proc, want = module(*args), run(*args)
        assert (proc.returncode, proc.stdout, proc.stderr) == (want.returncode, want.stdout, want.stderr), args
    out = tmp_path / "plan.json"
    proc = module(*plan_args(loads_file[0]), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text())["phy2log"] == eplb.rebalance_experts(loads_file[1], 24, 4, 2, 8)[0].tolist()


def test_bare_command_prints_usage_and_commands():
    proc = run()
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.startswith("usage: eplb-triton [-h] [--version] COMMAND ...")
    commands = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("    ")]
    assert commands == ["plan", "bench"]


def _options(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.Action]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [(f"{name} {o}", a) for o, a in _options(sub)]
        elif action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            found.append((action.option_strings[-1], action))
    return found


def test_every_option_has_help_with_its_default():
    options = _options(cli.build_parser()) + [(f"bench {o}", a) for o, a in _options(bench.build_parser())]
    assert {"plan --policy", "plan --plot", "bench --deepseek", "bench --out"} <= {name for name, _ in options}
    for name, action in options:
        assert action.help, name
        assert action.required or "(default: " in action.help or "; default: " in action.help, name
        if action.default not in (None, False, []):
            assert f"default: {action.default}" in action.help, name


def test_license_and_py_typed_are_declared():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^license = \{ text = "MIT" \}$', pyproject, re.MULTILINE)
    # setuptools >= 69 adds py.typed by itself; the declared floor (>= 64) needs it as package data
    assert re.search(r'^\[tool\.setuptools\.package-data\]\neplb_triton = \["py\.typed"\]', pyproject, re.MULTILINE)
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the eplb-triton authors\n")
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text
    assert (ROOT / "eplb_triton" / "py.typed").is_file()


def test_license_and_py_typed_ship_in_the_wheel(tmp_path):
    """A wheel built from the project's files holds eplb_triton/py.typed and the MIT LICENSE."""
    pytest.importorskip("setuptools.build_meta")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for name in ("eplb_triton", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    code = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=src, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    with zipfile.ZipFile(tmp_path / "dist" / proc.stdout.split()[-1]) as wheel:
        names = wheel.namelist()
        licenses = [n for n in names if n.endswith("/LICENSE") and ".dist-info/" in n]
        assert "eplb_triton/py.typed" in names and "eplb_triton/__main__.py" in names
        assert len(licenses) == 1 and wheel.read(licenses[0]) == (ROOT / "LICENSE").read_bytes()


# --- plan: policy, dense layers, labels, plot


@pytest.mark.parametrize(
    ("policy", "groups", "nodes", "label", "runs"),
    [("auto", 4, 2, "hierarchical", (4, 2)), ("hierarchical", 4, 2, "hierarchical", (4, 2)),
     ("global", 4, 2, "global", (1, 1)), ("auto", 3, 2, "global", (1, 1)), ("global", 1, 1, "global", (1, 1)),
     ("hierarchical", 1, 1, "global", (1, 1))],
)  # fmt: skip
def test_plan_policy(tmp_path, loads_file, capsys, policy, groups, nodes, label, runs):
    path, w = loads_file
    hierarchical = eplb.rebalance_experts(w, 24, 4, 2, 8)[0]
    flat = eplb.rebalance_experts(w, 24, 1, 1, 8)[0]
    assert not torch.equal(hierarchical, flat)  # the loads tell the two policies apart
    out = tmp_path / "plan.json"
    args = plan_args(path)
    args[args.index("--groups") + 1], args[args.index("--nodes") + 1] = str(groups), str(nodes)
    code, _, err = call(capsys, *args, "--policy", policy, "--out", out)
    assert code == 0, err
    plan = json.loads(out.read_text())
    assert plan["config"]["policy"] == label
    assert (plan["config"]["groups"], plan["config"]["nodes"]) == (groups, nodes)  # the deployment, as given
    assert plan["phy2log"] == (hierarchical if runs == (4, 2) else flat).tolist()


def test_plan_hierarchical_policy_needs_groups_divisible_by_nodes(tmp_path, loads_file, capsys):
    args = plan_args(loads_file[0])
    args[args.index("--groups") + 1] = "3"
    code, out, err = call(capsys, *args, "--policy", "hierarchical", "--out", tmp_path / "plan.json")
    assert code == 2 and out == ""
    assert err == ("eplb-triton: error: --policy hierarchical needs --groups (3) to be a multiple of --nodes (2); "
                   "use --policy global or auto\n")  # fmt: skip
    assert not (tmp_path / "plan.json").exists()


@pytest.fixture
def dense_layer_files(tmp_path):
    """4 MoE layers with all-zero (dense) layers at rows 0 and 3 of the file, in every format."""
    w = make_loads(4, 16, "skewed", 5)
    rows = w.tolist()
    rows = [[0] * 16, rows[0], rows[1], [0] * 16, rows[2], rows[3]]
    table = torch.tensor(rows)
    paths = {
        "json": tmp_path / "l.json", "csv": tmp_path / "l.csv", "npy": tmp_path / "l.npy", "pt": tmp_path / "l.pt",
    }  # fmt: skip
    paths["json"].write_text(json.dumps({"logical_count": rows}))
    paths["csv"].write_text("\n".join(",".join(str(x) for x in row) for row in rows) + "\n")
    np.save(paths["npy"], table.numpy())
    torch.save(table, paths["pt"])
    return paths, w


@pytest.mark.parametrize("fmt", ["json", "csv", "npy", "pt"])
def test_plan_drops_dense_layers_in_every_format(tmp_path, capsys, dense_layer_files, fmt):
    paths, w = dense_layer_files
    out = tmp_path / "plan.json"
    code, stdout, err = call(capsys, *plan_args(paths[fmt]), "--out", out)
    assert code == 0, err
    assert err.splitlines()[0] == f"l.{fmt}: dropped 2 all-zero (dense) layers: rows [0, 3]"
    labels = [int(line.split()[0]) for line in stdout.splitlines()[1:-2]]
    assert labels == [1, 2, 4, 5]  # the model layer index: the row in the file
    assert stdout.splitlines()[-1].startswith("bound (proven: no placement of the hierarchical policy")
    plan = json.loads(out.read_text())
    assert plan["model_layers"] == [1, 2, 4, 5] and plan["config"]["layers"] == 4
    ceiling = w.double().sum(1) / 8 / metrics.lower_bound(w, 24, 8, num_groups=4, num_nodes=2)
    assert plan["balancedness"]["bound"] == ceiling.tolist()
    assert all(a <= b for a, b in zip(plan["balancedness"]["after"], plan["balancedness"]["bound"], strict=True))
    assert plan["phy2log"] == eplb.rebalance_experts(w, 24, 4, 2, 8)[0].tolist()


def test_plan_bound_is_the_policy_that_runs(tmp_path, capsys, dense_layer_files):
    """--policy global plans with G = N = 1: its proven ceiling is the global one, not the
    hierarchical policy's (which is lower, and would be no ceiling for the global plan)."""
    paths, w = dense_layer_files
    out = tmp_path / "plan.json"
    code, stdout, err = call(capsys, *plan_args(paths["npy"]), "--policy", "global", "--out", out)
    assert code == 0, err
    assert stdout.splitlines()[-1].startswith("bound (proven: no placement of the global policy")
    bound = json.loads(out.read_text())["balancedness"]["bound"]
    assert bound == metrics.ceiling(w, 24, 8).tolist()
    assert bound != metrics.ceiling(w, 24, 8, num_groups=4, num_nodes=2).tolist()


@pytest.mark.parametrize("fmt", ["json", "csv", "npy"])
def test_plan_refuses_a_file_of_only_dense_layers(tmp_path, capsys, fmt):
    path = tmp_path / f"zeros.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps({"logical_count": [[0] * 16] * 2}))
    elif fmt == "csv":
        path.write_text("0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0\n" * 2)
    else:
        np.save(path, np.zeros((2, 16)))
    code, _, err = call(capsys, *plan_args(path))
    assert code == 2
    assert err == f"eplb-triton: error: {path}: every layer is all zero\n"


def test_plot_labels_model_layers_and_draws_node_boundaries(tmp_path, capsys, dense_layer_files, monkeypatch):
    pytest.importorskip("matplotlib")
    paths, _ = dense_layer_files
    figures = []
    original = cli.placement_figure
    monkeypatch.setattr(cli, "placement_figure", lambda *a, **k: figures.append(original(*a, **k)) or figures[-1])
    args = plan_args(paths["csv"])
    args[args.index("--gpus") + 1], args[args.index("--replicas") + 1] = "12", "36"  # 2 nodes of 6 GPUs
    png = tmp_path / "x.png"
    code, _, err = call(capsys, *args, "--plot", png)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    before, after = fig.axes[:2]
    assert list(before.get_yticks()) == [0, 1, 2, 3]
    assert [t.get_text() for t in before.get_yticklabels()] == ["1", "2", "4", "5"]
    for ax in (before, after):
        vertical = [line.get_xdata()[0] for line in ax.lines if line.get_xdata()[0] == line.get_xdata()[1]]
        assert vertical == [5.5]  # between GPU 5 and GPU 6


def test_plot_tick_labels_stay_readable_for_many_layers():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    loads = torch.rand(100, 8, dtype=torch.float64)
    layers = list(range(3, 103))
    fig = cli.placement_figure(loads, loads, "t", layers, nodes=4)
    try:
        ax = fig.axes[0]
        assert list(ax.get_yticks()) == list(range(0, 100, 3))
        assert [t.get_text() for t in ax.get_yticklabels()] == [str(layers[i]) for i in range(0, 100, 3)]
        assert sorted(line.get_xdata()[0] for line in ax.lines) == [1.5, 3.5, 5.5]
    finally:
        plt.close(fig)


def test_plan_from_an_old_plan_reports_moves(tmp_path, capsys):
    # a plan of one load file serves the next: relabelled to it, incremental, gated; slots moved reported
    first, second = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(first, make_loads(3, 16, "skewed", 1).numpy())
    np.save(second, make_loads(3, 16, "skewed", 2).numpy())
    old_json = tmp_path / "old.json"
    base = ["--replicas", "24", "--groups", "4", "--nodes", "2", "--gpus", "8"]
    assert main(["plan", "--loads", str(first), *base, "--out", str(old_json)]) == 0
    old = torch.tensor(json.loads(old_json.read_text())["phy2log"])
    w = torch.from_numpy(np.load(second))
    for extra, kwargs in (
        ([], {}),
        (["--method", "refined"], {"method": "refined"}),
        (["--max-moves", "3"], {"max_moves": 3}),
        (["--max-moves", "0.25"], {"max_moves": 6}),
        (["--min-gain", "0.05"], {"min_gain": 0.05}),
    ):
        out = tmp_path / "new.json"
        capsys.readouterr()
        assert main(["plan", "--loads", str(second), *base, "--old", str(old_json), "--out", str(out), *extra]) == 0
        printed = capsys.readouterr().out
        plan = json.loads(out.read_text())
        want = eplb.rebalance_experts(w, 24, 4, 2, 8, old_phy2log=old, **kwargs)[0]
        assert plan["phy2log"] == want.tolist(), extra
        assert plan["moved"] == (want != old).sum(dim=1).tolist()
        assert f"slots moved {sum(plan['moved'])} of 72" in printed and " moved " in printed.splitlines()[0]


def test_plan_around_lost_gpus(tmp_path, capsys):
    path = tmp_path / "loads.npy"
    np.save(path, make_loads(2, 16, "skewed", 3).numpy())
    out = tmp_path / "plan.json"
    base = ["plan", "--loads", str(path), "--replicas", "24", "--groups", "4", "--nodes", "2", "--gpus", "8"]
    assert main([*base, "--active-gpus", "11101111", "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    mask = [True, True, True, False, True, True, True, True]
    want = eplb.rebalance_experts(make_loads(2, 16, "skewed", 3), 24, 4, 2, 8, active_gpus=mask)[0]
    assert plan["phy2log"] == want.tolist() and plan["config"]["active_gpus"] == mask
    w = make_loads(2, 16, "skewed", 3).double()
    live = torch.tensor(mask)
    after = metrics.gpu_loads(w, want, torch.tensor(plan["logcnt"]), 8)[:, live]
    assert plan["balancedness"]["after"] == metrics.balancedness(after).tolist(), "over the live GPUs"
    # the plan, with its empty slots, is the next plan's placement in service
    again = tmp_path / "again.json"
    assert main([*base, "--active-gpus", "11101111", "--old", str(out), "--out", str(again)]) == 0
    plan2 = json.loads(again.read_text())
    kept = eplb.rebalance_experts(make_loads(2, 16, "skewed", 3), 24, 4, 2, 8, active_gpus=mask, old_phy2log=want)
    assert plan2["phy2log"] == kept[0].tolist() and plan2["moved"] == [0, 0]
    assert plan2["balancedness"]["before"] == plan2["balancedness"]["after"] == plan["balancedness"]["after"]
    fractional = dict(plan, phy2log=[[v + 0.5 for v in row] for row in plan["phy2log"]])
    bad = tmp_path / "fractional.json"
    bad.write_text(json.dumps(fractional))
    capsys.readouterr()
    assert main([*base, "--old", str(bad)]) == 2
    assert "phy2log must be a rectangular list of integers" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--max-moves", "3"], "--max-moves and --min-gain need --old PLAN.json"),
        (["--min-gain", "0.1"], "--max-moves and --min-gain need --old PLAN.json"),
        (["--active-gpus", "1110"], "--active-gpus '1110': 4 entries for --gpus 8"),
        (["--active-gpus", "11x01111"], "one 0 or 1 per GPU"),
        (["--old", "missing.json"], "--old missing.json"),
        (["--max-moves", "1.5"], "a fraction of the slots must be in (0, 1]"),
        (["--min-gain", "1"], "must be in [0, 1)"),
    ],
)
def test_plan_options_errors(tmp_path, capsys, extra, words):
    path = tmp_path / "loads.npy"
    np.save(path, make_loads(2, 16, "skewed", 3).numpy())
    argv = ["plan", "--loads", str(path), "--replicas", "24", "--groups", "4", "--nodes", "2", "--gpus", "8", *extra]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1, err
