"""The static cost report (benchmarks/kernel_report.py): its SASS reading and timing model on
hand-written SASS, its refusal to run under the interpreter, and one real sm_90 compilation.

Expected values are worked out by hand from the control bits written here, not from the report.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "kernel_report.py"


@pytest.fixture(scope="module")
def kr():
    spec = importlib.util.spec_from_file_location("kernel_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def sass(*lines: tuple[str, int, int, int]) -> str:
    """cuobjdump-style SASS: ``(text, stall, write scoreboard, wait mask)`` at 0x0, 0x10, ..."""
    out = []
    for n, (text, stall, write_sb, wait) in enumerate(lines):
        ctrl = (stall << 41) | (write_sb << 46) | (7 << 49) | (wait << 52)
        out.append(f"        /*{16 * n:04x}*/   {text} ;   /* 0x0000000000000000 */")
        out.append(f"                                 /* 0x{ctrl:016x} */")
    return "\n".join(out) + "\n"


def test_control_bits_and_a_scoreboard_wait(kr):
    body = kr.parse_cuobjdump_sass(
        sass(
            ("SHFL.BFLY PT, R2, R3, 0x1, 0x1f", 1, 0, 0),
            ("ISETP.GT.U32.AND P0, PT, R2, R3, PT", 2, 7, 0b1),
            ("EXIT", 1, 7, 0),
        )
    )
    assert [(i.stall, i.write_sb, i.wait) for i in body] == [(1, 0, 0), (2, 7, 1), (1, 7, 0)]
    cost, _, _ = kr.simulate(body, [])
    # SHFL at 0, result at 26; ISETP waits from 1 to 26, next issue at 28; EXIT at 28, done at 29
    assert cost.static == 4
    assert cost.waits == {"shfl": kr.LATENCY["shfl"] - 1}
    assert cost.total == kr.LATENCY["shfl"] + 3


def test_loop_trips_from_a_decrementing_counter(kr):
    body = kr.parse_cuobjdump_sass(
        sass(
            ("UMOV UR4, 0x48", 1, 7, 0),
            ("UIADD3 UR4, UR4, -0x4, URZ", 1, 7, 0),
            ("ISETP.NE.U32.AND P1, PT, RZ, UR4, PT", 1, 7, 0),
            ("@P1 BRA 0x10", 1, 7, 0),
            ("EXIT", 1, 7, 0),
        )
    )
    (loop,) = kr.find_loops(body)
    assert (loop.start, loop.end, loop.size) == (1, 3, 3)
    loop.trips = kr._counter_trips(body, loop)
    assert loop.trips == 72 // 4
    cost, _, _ = kr.simulate(body, [loop])
    assert cost.total == 1 + 18 * 3 + 1
    assert loop.cost.total == 18 * 3


def test_loop_trips_from_a_64_bit_counter_compared_after_the_step(kr):
    # x0 = -16; do { x0 += 16; ... } while (x0 < 17): x0 = 0, 16, 32 -> three trips
    body = kr.parse_cuobjdump_sass(
        sass(
            ("IMAD.MOV.U32 R3, RZ, RZ, -0x10", 1, 7, 0),
            ("IADD3 R3, P0, R3, 0x10, RZ", 1, 7, 0),
            ("ISETP.GE.U32.AND P0, PT, R3, 0x11, PT", 1, 7, 0),
            ("ISETP.GE.U32.AND.EX P0, PT, R4, RZ, PT, P0", 1, 7, 0),
            ("@!P0 BRA 0x10", 1, 7, 0),
            ("EXIT", 1, 7, 0),
        )
    )
    (loop,) = kr.find_loops(body)
    assert kr._counter_trips(body, loop) == 3


def test_the_slow_path_call_is_skipped_and_not_part_of_the_kernel(kr):
    body = kr.parse_cuobjdump_sass(
        sass(
            ("FCHK P0, R2, R3", 1, 0, 0),
            ("@!P0 BRA 0x40", 1, 7, 0b1),
            ("MOV R4, 0x40", 1, 7, 0),
            ("CALL.REL.NOINC 0x60", 1, 7, 0),
            ("EXIT", 1, 7, 0),
            ("NOP", 1, 7, 0),
            ("RET.REL.NODEC R4 0x0", 1, 7, 0),
        )
    )
    body = kr.main_function(body)
    assert [i.base for i in body] == ["FCHK", "BRA", "MOV", "CALL", "EXIT", "NOP"]
    cost, _, _ = kr.simulate(body, [])
    # FCHK at 0 (result at 20), BRA waits until 20, jumps over MOV and CALL, EXIT at 21
    assert cost.total == kr.LATENCY["xu"] + 2


def test_a_loop_that_leaves_from_its_body_on_the_last_trip(kr):
    body = kr.parse_cuobjdump_sass(
        sass(
            ("NOP", 1, 7, 0),
            ("IADD3 R1, R1, 0x1, RZ", 2, 7, 0),  # loop start
            ("@P0 BRA 0x60", 1, 7, 0),  # the exit: taken on the last trip only
            ("IADD3 R2, R2, 0x1, RZ", 3, 7, 0),
            ("@P1 BRA 0x10", 1, 7, 0),  # back branch
            ("NOP", 5, 7, 0),  # after the loop, skipped by the exit
            ("EXIT", 1, 7, 0),
        )
    )
    (loop,) = kr.find_loops(body)
    loop.exit_at = 2
    # a full trip is 2 + 1 + 3 + 1 = 7 cycles, the last one 2 + 1 = 3 up to the exit
    for trips, cycles in ((1, 3), (3, 7 + 7 + 3), (10, 9 * 7 + 3)):  # 10: four exact trips, five extrapolated
        loop.trips = trips
        cost, _, _ = kr.simulate(body, [loop])
        assert loop.cost.total == cycles
        assert cost.total == 1 + cycles + 1
    loop.exit_at = None  # a plain loop runs its trips and the code after it
    cost, _, _ = kr.simulate(body, [loop])
    assert cost.total == 1 + 10 * 7 + 5 + 1


def test_only_a_guard_around_a_slow_path_call_is_taken(kr):
    body = kr.parse_cuobjdump_sass(
        sass(
            ("@P0 BRA 0x60", 1, 7, 0),  # an if around code that holds a branch and the call: falls through
            ("@P1 BRA 0x40", 1, 7, 0),  # the slow-path guard: taken
            ("MOV R4, 0x40", 1, 7, 0),
            ("CALL.REL.NOINC 0x80", 1, 7, 0),
            ("NOP", 1, 7, 0),
            ("NOP", 1, 7, 0),
            ("EXIT", 1, 7, 0),
            ("NOP", 1, 7, 0),
            ("RET.REL.NODEC R4 0x0", 1, 7, 0),
        )
    )
    body = kr.main_function(body)
    cost, _, _ = kr.simulate(body, [])
    assert cost.total == 5  # BRA, BRA (taken), NOP, NOP, EXIT


def test_labels_compare_across_a_renamed_configuration(kr):
    def row(config: str, cycles: int) -> dict:
        return {"kernel": "_replicate_kernel", "config": config, "loop": "(whole program)", "row": "total",
                "cycles": cycles}  # fmt: skip

    labels = {
        "baseline": [row("decode-EP64", 1), row("prefill-EP32 = deepseek-v3-prefill-ep32", 2)],
        "after": [
            row("decode-EP64 = deepseek-v3-decode-ep64", 3),
            row("prefill-EP32 = deepseek-v3-prefill-ep32", 4),
            row("prefill-EP32 (strided views)", 5),
        ],
    }
    entries = kr.compared(labels, "after")
    got = [(e["config"], {k: r["cycles"] for k, r in e["rows"].items()}) for e in entries]
    assert got == [
        ("decode-EP64 = deepseek-v3-decode-ep64", {"baseline": 1, "after": 3}),
        ("prefill-EP32 = deepseek-v3-prefill-ep32", {"baseline": 2, "after": 4}),
        ("prefill-EP32 (strided views)", {"after": 5}),
    ]


def test_dispatch_jobs_compile_the_unit_strides_of_contiguous_rows_in(kr):
    """The JIT makes an int argument equal to 1 a constant: the strides that are 1 for one layer's rows of
    the balancer's contiguous log2phy [L, E, X], logcnt [L, E] and counts [L, E]."""
    torch = pytest.importorskip("torch")
    log2phy, logcnt, counts = torch.empty(4, 256, 33), torch.empty(4, 256), torch.empty(4, 256)
    strides = dict(
        stride_l2p_e=log2phy[1].stride(0), stride_l2p_x=log2phy[1].stride(1), stride_cnt=logcnt[1].stride(0),
        stride_counts=counts[1].stride(0),
    )  # fmt: skip
    assert kr.DISPATCH_UNIT_STRIDES == {k: 1 for k, v in strides.items() if v == 1}
    dispatch = [j for j in kr.jobs() if j.kernel == "_record_dispatch_kernel"]
    contiguous = [j for j in dispatch if "any strides" not in j.shape]
    assert contiguous and all(kr.DISPATCH_UNIT_STRIDES.items() <= j.constexprs.items() for j in contiguous)
    assert all(not any(k.startswith("stride") for k in j.constexprs) for j in dispatch if j not in contiguous)


def test_refuses_to_run_under_the_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "TRITON_INTERPRET" in done.stderr
    assert not any(tmp_path.iterdir())


ANALYSE_ONE = """
import sys
sys.path.insert(0, {bench!r})
import kernel_report as kr
from eplb_triton import launch
from eplb_triton._validation import Config
import inspect
from pathlib import Path
fns = kr.kernel_functions()
fors, lines = kr.source_fors(sorted(Path(inspect.getsourcefile(fns["_rebalance_kernel"].fn)).parent.glob("_*.py")))
ln = launch.rebalance_launch(Config(58, 256, 256, 1, 1, 8).effective())  # EP8-no-redundancy: only the packing
a = kr.analyse(kr.compile_kernel(fns["_rebalance_kernel"], ln.constexprs, ln.num_warps, 90), ln.constexprs, fors, lines)
greedy = [lp for lp in a.loops if "packing" in lp.name]
print(len(greedy), greedy[0].mapping, greedy[0].iterations, greedy[0].trips, greedy[0].unroll, a.res["REG"] > 0)
print(greedy[1].name, greedy[1].iterations, greedy[1].trips)
"""


def test_one_real_compilation_maps_its_loop_through_the_line_table():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ANALYSE_ONE.format(bench=str(SCRIPT.parent))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    # R = E: no replica to place; 256 slots packed onto 8 GPUs: the first 8 without a step, the other
    # 248 four per trip of the main loop (runtime bounds: the counts come from SOURCE_LOOPS), none left
    main, rest = done.stdout.splitlines()
    assert main.split() == ["2", "line", "info", "248", "62", "4", "True"]
    assert rest == "slot packing, last steps 0 0"


ANALYSE_SPLIT = """
import sys
sys.path.insert(0, {bench!r})
import kernel_report as kr
import inspect
from pathlib import Path
fns = kr.kernel_functions()
fors, lines = kr.source_fors(sorted(Path(inspect.getsourcefile(fns["_rebalance_kernel"].fn)).parent.glob("_*.py")))
job = next(j for j in kr.jobs() if j.kernel == "_balanced_split_kernel" and "prefill-EP32" in j.config.split(" = "))
compiled = kr.compile_kernel(fns[job.kernel], job.constexprs, job.num_warps, 90, job.maxnreg)
a2, a1 = (kr.analyse(compiled, dict(job.constexprs, **v), fors, lines) for v in job.variants())
for lp in sorted(a2.loops, key=lambda lp: lp.name):
    print(lp.name.split(":")[0], lp.mapping, lp.trips, lp.exit_at is not None)
e = kr.split_estimate(job, a2, a1)
total = kr.rows_of("t", job, a2, a1)[0]
run = job.run
print(job.maxnreg, e.setup.total > 0, e.round1.total > 0, e.extra.total > 0, e.level > 0, e.step > 0)
print(round(e.program(run.rounds_mean, run.levels).total) == total["cycles"])
print(abs(e.program(job.variants()[0]["rounds"], 2).total - a2.cost.total) < 1e-6)
"""


def test_the_split_kernel_maps_its_data_dependent_loops(kr):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ANALYSE_SPLIT.format(bench=str(SCRIPT.parent))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout.splitlines()
    rounds = max(1, kr.SPLIT_RUNS[("prefill-EP32", 288, 32)].rounds_max)
    # nested loops, each named after its own source loop; the level loop leaves at its target
    assert out[:3] == [
        "split path walk line info 2 False",
        f"split rounds line info {rounds} False",
        "split search line info 2 True",
    ]
    assert out[3:] == ["255 True True True True True", "True", "True"]
