"""Static cost report of the Triton kernels for a real NVIDIA target, without a GPU.

Each kernel is compiled ahead of time for ``sm_<arch>`` (default 90, H100/H200) with the ``ptxas``
that Triton ships, at every shipped configuration, with exactly the constexprs, ``num_warps`` and
``maxnreg`` of :mod:`eplb_triton.launch` (the functions the launchers call), and the int arguments the
JIT would specialise to the constant 1 (the record + dispatch kernel's unit strides of contiguous rows).
The kernels: the fused rebalance, replicate, balanced packing, record + dispatch, and the per-step
balanced split (DeepSeek-V3 deployments). From the cubin it reads:

* registers, shared memory and local memory (spills) from ``cuobjdump --dump-resource-usage``;
* the SASS (``cuobjdump -sass``: instructions and their control bits) and its source lines
  (``nvdisasm -c -gi``). Loops are the backward branches (``BRA`` to a lower address);
  each is mapped to its source loop (``for`` or ``while``) through the line information (the inline
  chain tells the group packing from the slot packing), its trip count comes from the loop counter in
  the SASS, and its iteration count from the constexprs, or, for the split kernel's data-dependent
  loops (rounds, search levels, path steps), from measured and stated assumptions (``SPLIT_RUNS``);
* per loop iteration: shuffles (SHFL), barriers (BAR), warp reductions (REDUX), shared-memory ops
  (LDS/STS), global-memory ops (LDG/STG/ATOM/RED);
* an estimated critical path in cycles: one warp issuing the SASS in order with the stall counts
  ptxas wrote into the control bits, plus published Hopper/Ampere latencies for the scoreboarded
  instructions (SHFL, REDUX, LDS, LDG, ...; see ``LATENCY`` and the report), and the time of one call
  from it (for the split kernel: set-up, one round, and a layer at the mean and the worst rounds). It is
  an order-of-magnitude estimate, not a measurement.

Writes ``kernel_report-<label>.csv`` (this run), ``kernel_report.csv`` (the rows of every label found
in the output folder) and ``kernel_report.md`` (the detailed report of this run and a
comparison table across labels) under ``--out``. A later change to the kernels records itself with
``--label after`` next to the committed ``baseline``.

Run (no GPU needed; refuses to run under ``TRITON_INTERPRET``)::

    python benchmarks/kernel_report.py [--out DIR] [--arch 90] [--label baseline]
"""

from __future__ import annotations

import argparse
import ast
import csv
import datetime
import inspect
import math
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "static-sm90"
sys.path.insert(0, str(HERE))
import aot  # noqa: E402  (the ahead-of-time harness, shared with the compile tests)

# ----------------------------------------------------------------------------------------------
# Timing model. ptxas encodes its own schedule in every instruction's control bits: a stall count
# (cycles before the warp may issue its next instruction; it covers every fixed-latency dependence
# and the pipe throughput ptxas knows for sm_90), and for variable-latency instructions a scoreboard
# that later instructions wait on. The model takes the stall counts as they are and needs a latency
# only for the scoreboarded instructions (cycles from issue to result). Rough values inside the ranges
# published for Volta-Hopper: Jia et al., "Dissecting the NVIDIA Volta GPU Architecture via
# Microbenchmarking" (2018) and "... Turing T4 ..." (2019); Luo et al., "Benchmarking and Dissecting the
# Nvidia Hopper GPU Architecture" (2024). The report prints this table.
# ----------------------------------------------------------------------------------------------
LATENCY = {
    "shfl": 26,  # SHFL round trip: ~23-30
    "redux": 26,  # REDUX (sm_80+ warp reduction into a uniform register): no published figure; taken as SHFL
    "lds": 28,  # shared-memory load: ~23-33
    "ldg": 260,  # global load, L2 hit: ~200-300 (the rows and the scratch were just written: L2-resident)
    "atom": 260,  # global atomic with a return value: an L2 round trip
    "xu": 20,  # MUFU.RCP, FCHK (special-function unit): ~15-25 (assumed)
    "conv": 6,  # POPC, I2F-class conversions on the XU (assumed)
    "const": 10,  # LDC/ULDC constant cache hit, S2R/S2UR special registers (assumed)
    "bar": 20,  # BAR.SYNC with all warps arriving together: ~20
    "read": 4,  # a store's or load's source operands read (read scoreboard released; assumed)
}
L2_MISS = 500  # global load from DRAM: ~400-600 (quoted, not used by the model)
CLOCK_GHZ = 1.98  # H100 SXM / H200 boost clock (same SM)
NUM_SMS = 132  # H100 SXM / H200
LAUNCH_US = 5.0  # launch overhead of one eager kernel launch (assumed, ~3-6 us)
HBM_TBPS = 3.35  # H100 SXM HBM3 bandwidth (H200: 4.8), for the log2phy fill's bytes

# Opcode (before the first '.') -> counter column, for the per-iteration counts.
COUNTED = {
    "SHFL": "shfl",
    "BAR": "bar",
    "REDUX": "redux",
    "CREDUX": "redux",
    "LDS": "lds",
    "STS": "sts",
    "LDSM": "lds",
    "ATOMS": "lds",
    "LDG": "ldg",
    "STG": "stg",
    "ATOMG": "atom",
    "ATOM": "atom",
    "RED": "atom",
    "REDG": "atom",
    "LDL": "local",
    "STL": "local",
}
COUNT_COLUMNS = ["shfl", "bar", "redux", "lds", "sts", "ldg", "stg", "atom", "local"]

CONTROL = {"BRA", "BSSY", "BSYNC", "EXIT", "CALL", "RET", "NOP", "WARPSYNC", "DEPBAR", "YIELD", "BPT", "BMOV"}
CONVERSIONS = {"I2F", "F2I", "F2F", "I2I", "FRND", "POPC", "FLO", "BREV"}
XU = {"MUFU", "FCHK"}
CONSTANTS = {"LDC", "ULDC", "S2R", "S2UR", "CS2R"}


def _sorted_loops(site: str, name: str, rest_name: str, items_packs) -> list[tuple]:
    """SOURCE_LOOPS entries of one ``_pack_sorted`` call site: its main loop and its last steps.
    ``items_packs(constexprs)`` gives (items, packs); every weight > 0 is assumed, so the greedy takes
    all items but the first round (one per pack)."""

    def steps(c: dict) -> int:
        items, packs = items_packs(c)
        return items - packs

    return [
        ("_pack_sorted", (site, "range(first + 4"), name, lambda c: (steps(c) // 4 * 4, 4)),
        ("_pack_sorted", (site, "range(end, NUM_ITEMS)"), rest_name, lambda c: (steps(c) % 4, 1)),
    ]


# Source loops: (function holding the `for` or `while`, text of the call site or of the loop line, name,
# iterations[, options]). ``iterations`` gets the constexprs and the assumed counts of data-dependent loops
# (``Job.variants``). Options: ``exit``, the text of the source line whose conditional branch leaves the loop
# from inside its body on the last trip (a search that stops when it finds its target).
SOURCE_LOOPS = [
    ("_pack_greedy", "_pack_greedy(b_gload", "group packing: G groups onto N nodes", lambda c: c["G"]),
    # _pack_sorted: the first round (P/N items when every load is > 0) takes no step; the other items
    # run four per trip of the main loop, the rest (< 4) in a loop of their own. Runtime bounds: the
    # iterations and the unrolling are given here, as (iterations, source iterations per trip).
    *_sorted_loops(
        "_pack_sorted(b_items",
        "slot packing: R/N slots onto P/N GPUs",
        "slot packing, last steps",
        lambda c: (c["R"] // c["N"], c["P"] // c["N"]),
    ),
    *_sorted_loops(
        "_pack_sorted(b_w",
        "packing: NUM_ITEMS items",
        "packing, last steps",
        lambda c: (c["NUM_ITEMS"], c["NUM_PACKS"]),
    ),
    (
        "_replicate_greedy",
        "_replicate_greedy(b_wn",
        "replication: R/N - E/N replicas",
        lambda c: c["R"] // c["N"] - c["E"] // c["N"],
    ),
    (
        "_replicate_greedy",
        "_replicate_greedy(b_w,",
        "replication: NUM_PHY - NUM_LOG replicas",
        lambda c: c["NUM_PHY"] - c["NUM_LOG"],
    ),
    ("_rebalance_kernel", "range(GS)", "group loads: E/G experts per group", lambda c: c["E"] // c["G"]),
    (
        "_rebalance_kernel",
        "range(0, GS * WIDTH, BLOCK_F)",
        "log2phy -1 fill: E/G x WIDTH entries of each of the node's groups, BLOCK_F per iteration",
        lambda c: -(-(c["E"] // c["G"] * c["WIDTH"]) // c["BLOCK_F"]),
    ),
    # The per-step balanced split: data-dependent loops, their counts are assumptions (SPLIT_RUNS).
    ("_balanced_split_kernel", "while (rounds < limit)", "split rounds: rounds of step 4", lambda c: c["rounds"]),
    (
        "_balanced_split_kernel",
        "while searching",
        "split search: breadth-first levels of a round",
        lambda c: c["levels"],
        {"exit": "if code < NEW_ONLY"},  # an augmenting round leaves the level loop at its target
    ),
    ("_balanced_split_kernel", "while link < NO_LINK", "split path walk: steps of a round", lambda c: c["path_steps"]),
]
GREEDY = ("packing", "replication")  # loop names of the greedy chains
SPLIT_LOOPS = ("split rounds", "split search", "split path walk")  # loop names (before ':') of the split kernel


# ----------------------------------------------------------------------------------------------
# SASS parsing
# ----------------------------------------------------------------------------------------------
@dataclass
class Instr:
    addr: int
    text: str  # without the trailing ';'
    opcode: str  # with modifiers, e.g. SHFL.BFLY
    guard: str | None  # e.g. "!P0"
    operands: list[str]
    chain: tuple[tuple[str, int], ...] = ()  # (file name, line), innermost first
    target: int | None = None  # branch / call target
    stall: int = 1  # control bits: cycles before the next instruction may issue
    write_sb: int = 7  # scoreboard released when the result is ready (7: none)
    read_sb: int = 7  # scoreboard released when the operands have been read (7: none)
    wait: int = 0  # mask of the scoreboards waited on before issue

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


_INS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_INS_HEX = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;\s*/\*\s*0x[0-9a-f]+\s*\*/\s*\n\s*/\*\s*(0x[0-9a-f]+)\s*\*/")
_LOC = re.compile(r'//## File "([^"]+)", line (\d+)')
_TARGET = re.compile(r"(0x[0-9a-f]+)\s*$")


def _split_operands(rest: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in rest:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def parse_instruction(addr: int, text: str) -> Instr:
    guard = None
    body = text.strip()
    if body.startswith("@"):
        guard, body = body[1:].split(None, 1)
    parts = body.split(None, 1)
    opcode, rest = parts[0], (parts[1] if len(parts) > 1 else "")
    ins = Instr(addr, text.strip(), opcode, guard, _split_operands(rest))
    if ins.base in ("BRA", "CALL", "BSSY"):
        m = _TARGET.search(rest)
        ins.target = int(m.group(1), 16) if m else None
    return ins


def parse_cuobjdump_sass(text: str) -> list[Instr]:
    """Instructions of ``cuobjdump -sass``, with numeric branch targets and the control bits of the
    second 64-bit word (Volta and later: stall bits 41-44, yield 45, write scoreboard 46-48, read
    scoreboard 49-51, wait mask 52-57)."""
    out = []
    for m in _INS_HEX.finditer(text):
        ins = parse_instruction(int(m.group(1), 16), m.group(2))
        ctrl = int(m.group(3), 16)
        ins.stall = (ctrl >> 41) & 0xF
        ins.write_sb = (ctrl >> 46) & 0x7
        ins.read_sb = (ctrl >> 49) & 0x7
        ins.wait = (ctrl >> 52) & 0x3F
        out.append(ins)
    return out


def attach_lines(instrs: list[Instr], nvdisasm_gi: str) -> None:
    """Give each instruction the inline chain of source lines that ``nvdisasm -gi`` prints above it."""
    by_addr = {i.addr: i for i in instrs}
    chain: list[tuple[str, int]] = []
    fresh = False  # consecutive '//##' lines form one chain, innermost first
    for line in nvdisasm_gi.splitlines():
        m = _LOC.search(line)
        if m:
            if not fresh:
                chain, fresh = [], True
            chain.append((Path(m.group(1)).name, int(m.group(2))))
            continue
        m = _INS.search(line)
        if m:
            fresh = False
            ins = by_addr.get(int(m.group(1), 16))
            if ins is not None:
                ins.chain = tuple(chain)


# ----------------------------------------------------------------------------------------------
# Instruction classes
# ----------------------------------------------------------------------------------------------
def classify(ins: Instr) -> str:
    """Class of an instruction: a ``COUNTED`` column, or ctrl / xu / conv / const / other."""
    base = ins.base
    if base in COUNTED:
        return COUNTED[base]
    if base in CONTROL:
        return "ctrl"
    if base in XU:
        return "xu"
    if base in CONVERSIONS:
        return "conv"
    if base in CONSTANTS:
        return "const"
    return "other"


def latency_of(kind: str) -> int:
    """Cycles from issue to the result of a scoreboarded instruction of class ``kind``."""
    if kind in ("local",):
        return LATENCY["ldg"]
    return LATENCY.get(kind, 4)


# ----------------------------------------------------------------------------------------------
# Loops
# ----------------------------------------------------------------------------------------------
@dataclass
class Cost:
    """Cycles of a stretch of the path: ptxas's stall counts, plus the waits on scoreboards beyond
    them, by class of the instruction that the wait was for."""

    static: float = 0.0
    waits: Counter = field(default_factory=Counter)

    @property
    def total(self) -> float:
        return self.static + sum(self.waits.values())

    def add(self, other: Cost, times: float = 1.0) -> None:
        self.static += times * other.static
        for k, v in other.waits.items():
            self.waits[k] += times * v

    def minus(self, other: Cost) -> Cost:
        out = Cost(self.static - other.static, Counter(self.waits))
        out.waits.subtract(other.waits)
        return out

    def copy(self) -> Cost:
        return Cost(self.static, Counter(self.waits))


@dataclass
class Loop:
    start: int  # index of the first instruction of the body (the branch target)
    end: int  # index of the backward branch
    name: str = "?"
    mapping: str = "guess"  # "line info" or "guess (order)"
    iterations: int | None = None  # of the source loop
    trips: int | None = None  # of the SASS loop (from its counter)
    unroll: int | None = None  # source iterations per SASS trip
    counts: Counter = field(default_factory=Counter)  # per SASS trip
    reductions: str = ""
    by_line: str = ""  # share of the body's instructions by source line (top 4)
    cost: Cost | None = None  # estimated, all trips (set by simulate)
    additive: float = 0.0  # pessimistic model, all trips
    note: str = ""
    unrolled: int = 0  # > 0: no SASS loop, this many straight-line instructions (fully unrolled)
    exit_at: int | None = None  # index of the branch that leaves the loop from its body on the last trip

    @property
    def size(self) -> int:
        return self.unrolled or self.end - self.start + 1


def subroutines(instrs: list[Instr]) -> set[int]:
    """Addresses of the subroutines that ``CALL`` s reach (div_rn's slow path): targets from which a
    ``RET`` comes before any ``EXIT``. (sm_80 code also leaves loops with ``CALL.REL.NOINC`` to the
    instruction after the loop, which is no subroutine.)"""
    out = set()
    for target in {i.target for i in instrs if i.base == "CALL" and i.target is not None}:
        after = [i for i in instrs if i.addr >= target]
        end = next((i for i in after if i.base in ("RET", "EXIT") and not i.guard), None)
        if end is not None and end.base == "RET":
            out.add(target)
    return out


def is_slow_call(ins: Instr, subs: set[int]) -> bool:
    return ins.base == "CALL" and ins.target in subs


def main_function(instrs: list[Instr]) -> list[Instr]:
    """The kernel body: everything before the first subroutine (div_rn's slow path)."""
    subs = subroutines(instrs)
    limit = min(subs) if subs else math.inf
    body = [i for i in instrs if i.addr < limit]
    while body and body[-1].base in ("NOP", "BRA") and body[-1].target == body[-1].addr:
        body.pop()  # the trailing `BRA self` trap
    return body


def find_loops(body: list[Instr]) -> list[Loop]:
    index = {i.addr: k for k, i in enumerate(body)}
    loops = []
    for k, ins in enumerate(body):
        if ins.base == "BRA" and ins.target is not None and ins.target < ins.addr and ins.target in index:
            loops.append(Loop(index[ins.target], k))
    return loops


_IMM = re.compile(r"-?0x[0-9a-f]+")
_CMP = {
    "EQ": lambda a, b: a == b,
    "NE": lambda a, b: a != b,
    "LT": lambda a, b: a < b,
    "LE": lambda a, b: a <= b,
    "GT": lambda a, b: a > b,
    "GE": lambda a, b: a >= b,
}


def _counter_trips(body: list[Instr], loop: Loop) -> int | None:
    """Trip count of a loop from its counter: the compare that feeds the back branch, the constant
    step of the compared register in the body, and the constant it holds before the loop; the
    counter is then stepped until the branch falls through."""
    br = body[loop.end]
    if not br.guard:  # rotated loop (sm_80): an unconditional back branch, a conditional exit inside
        exits = [i for i in body[loop.start : loop.end] if i.guard and i.base in ("BRA", "CALL") and i.target > br.addr]
        if len(exits) != 1:
            return None
        br = exits[0]
        pred, negated = br.guard.lstrip("!"), not br.guard.startswith("!")  # goes on while the exit is not taken
    else:
        pred, negated = br.guard.lstrip("!"), br.guard.startswith("!")
    k_exit = body.index(br)
    for _ in range(2):  # sm_80 copies a uniform predicate: PLOP3.LUT P0, PT, PT, PT, UP0, 0x80, 0x0
        writer = next((i for i in reversed(body[loop.start : k_exit]) if i.operands[:1] == [pred]), None)
        if writer is None or writer.base not in ("PLOP3", "UPLOP3") or writer.operands[5:6] != ["0x80"]:
            break
        sources = [o for o in writer.operands[2:5] if o not in ("PT", "UPT")]
        if len(sources) != 1:
            break
        pred, negated = sources[0].lstrip("!"), negated != sources[0].startswith("!")
    setps = [i for i in body[loop.start : k_exit] if i.base in ("ISETP", "UISETP") and i.operands[0] == pred]
    setps = [i for i in setps if ".EX" not in i.opcode]  # the high word of a 64-bit compare is against 0
    if not setps:
        return None
    cmp = setps[-1]
    a, b = cmp.operands[2:4]
    if re.fullmatch(r"U?R\d+", a) and (b in ("RZ", "URZ") or _IMM.fullmatch(b)):
        reg, const, swapped = a, b, False
    elif re.fullmatch(r"U?R\d+", b) and (a in ("RZ", "URZ") or _IMM.fullmatch(a)):
        reg, const, swapped = b, a, True
    else:
        return None
    if len(cmp.operands) > 4 and cmp.operands[4] not in ("PT", "!PT", "UPT", "!UPT"):
        return None  # combined with another condition
    op = next((m for m in cmp.opcode.split(".")[1:] if m in _CMP), None)
    if op is None:
        return None
    limit = 0 if const in ("RZ", "URZ") else int(const, 16)
    unsigned = ".U32" in cmp.opcode
    k_cmp = body.index(cmp)
    step = k_step = None
    for k in range(loop.start, loop.end):
        i = body[k]
        if i.operands and i.operands[0] == reg and i.base in ("IADD3", "UIADD3", "VIADD", "IADD", "UIADD"):
            rest = [o for o in i.operands[1:] if not re.fullmatch(r"!?U?P(\d+|T)", o) and o not in ("RZ", "URZ")]
            imm = [o for o in rest if _IMM.fullmatch(o)]
            if len(imm) == 1 and [o for o in rest if o not in imm] == [reg]:
                step, k_step = int(imm[0], 16), k
    if not step:
        return None
    init = None
    pair = re.fullmatch(r"(U?R)(\d+)", reg)
    low_half = f"{pair.group(1)}{int(pair.group(2)) - 1}"  # CS2R Rk, SRZ zeroes Rk and Rk+1
    for i in reversed(body[: loop.start]):
        if i.base == "CS2R" and ".32" not in i.opcode and i.operands[:2] == [low_half, "SRZ"]:
            init = 0
            break
        if i.operands and i.operands[0] == reg:
            imm = [o for o in i.operands[1:] if _IMM.fullmatch(o)]
            zero = [o for o in i.operands[1:] if o not in ("RZ", "URZ", "SRZ")] == []
            if i.base in ("MOV", "UMOV") and imm:
                init = int(imm[0], 16)
            elif i.base in ("MOV", "UMOV", "CS2R") and zero:
                init = 0
            elif i.base == "IMAD" and "MOV" in i.opcode and (imm or zero):
                init = int(imm[-1], 16) if imm else 0
            break
    if init is None:
        return None

    def goes_on(x: int) -> bool:
        u, v = (x % 2**32, limit % 2**32) if unsigned else (x, limit)
        result = _CMP[op](v, u) if swapped else _CMP[op](u, v)
        return result != negated

    x, post = init, k_cmp > k_step
    for trips in range(1, 1 << 20):
        if post:
            x += step
        if not goes_on(x):
            return trips
        if not post:
            x += step
    return None


def _reductions(ins_list: list[Instr]) -> str:
    redux = Counter(i.opcode for i in ins_list if i.base in ("REDUX", "CREDUX"))
    shfl = Counter()
    for i in ins_list:
        if i.base == "SHFL":
            shfl[f"{i.opcode}[{i.operands[3] if len(i.operands) > 3 else '?'}]"] += 1
    parts = [f"{k} x{v}" for k, v in sorted(redux.items())] + [f"{k} x{v}" for k, v in sorted(shfl.items())]
    return ", ".join(parts)


# ----------------------------------------------------------------------------------------------
# Source loops and their names
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceFor:
    file: str
    function: str
    first: int
    last: int
    text: str  # the `for` or `while` line


def source_fors(paths: list[Path]) -> tuple[list[SourceFor], dict[tuple[str, int], str]]:
    """Every ``for`` and ``while`` loop in the kernel files, and the source text of each line (for the
    call sites)."""
    fors, lines = [], {}
    for path in paths:
        src = path.read_text()
        for n, text in enumerate(src.splitlines(), 1):
            lines[(path.name, n)] = text.strip()
        for fn in ast.walk(ast.parse(src)):
            if isinstance(fn, ast.FunctionDef):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.For, ast.While)):
                        fors.append(
                            SourceFor(path.name, fn.name, node.lineno, node.end_lineno, lines[(path.name, node.lineno)])
                        )
    return fors, lines


def loop_identity(ins: Instr, fors: list[SourceFor], lines: dict) -> tuple[SourceFor, str] | None:
    """(innermost source loop holding ``ins``, the call site line or the loop's line)."""
    for depth, (file, line) in enumerate(ins.chain):
        inside = [f for f in fors if f.file == file and f.first <= line <= f.last]
        if inside:
            f = min(inside, key=lambda f: f.last - f.first)
            site = ins.chain[depth + 1] if depth + 1 < len(ins.chain) else None
            return f, (lines.get(site, "") if site else f.text)
    return None


def name_of(identity: tuple[SourceFor, str], constexprs: dict) -> tuple[str, int | None]:
    """Name and iterations of a source loop from ``SOURCE_LOOPS``; ``constexprs`` may also hold the
    runtime assumptions of the job (``Job.variants``)."""
    f, site = identity
    for function, pattern, name, iterations, *_ in SOURCE_LOOPS:
        at, loop = pattern if isinstance(pattern, tuple) else (pattern, None)
        if f.function == function and (at in site or at in f.text) and (loop is None or loop in f.text):
            try:
                return name, iterations(constexprs)
            except KeyError:
                return name, None
    return f"{f.function}: {f.text}", None


def loop_options(name: str) -> dict:
    """The options of the ``SOURCE_LOOPS`` entry named ``name`` (``{}`` if none)."""
    return next((entry[4] for entry in SOURCE_LOOPS if entry[2] == name and len(entry) > 4), {})


# ----------------------------------------------------------------------------------------------
# Issue model: one warp, in-order issue, results ready after their latency
# ----------------------------------------------------------------------------------------------
EXACT_TRIPS = 4  # trips simulated exactly before extrapolating with the last trip's cycles


def simulate(body: list[Instr], loops: list[Loop], tags: list[str | None] | None = None) -> tuple[Cost, dict, Counter]:
    """Critical path of one program along the common path; fills ``loop.cost``.

    The warp issues the SASS in order: each instruction ``stall`` cycles after the previous one (the
    control bits), later if a scoreboard in its wait mask is still pending; a scoreboarded result is
    pending ``LATENCY`` cycles after issue; a barrier costs ``LATENCY["bar"]``. Loops run the trips
    read from their counter (the first ``EXACT_TRIPS`` exactly, the others at the last trip's cost).
    Forward branches fall through (a valid row takes every ``if``) except a guard around a slow-path
    ``CALL`` (the float division's, taken only for subnormal or special operands: a branch over the call
    and no other conditional branch or loop) and a loop's ``exit_at`` branch, taken on its last trip
    (the trips before it run the whole body). Returns the
    program's cost, per tag of ``tags`` (one per instruction) the cost of the tagged ones, and the
    waits outside loops by index of the instruction waited for.
    """
    index = {i.addr: k for k, i in enumerate(body)}
    by_end = {lp.end: lp for lp in loops}
    starts: dict[int, list[Loop]] = {}
    for lp in loops:
        starts.setdefault(lp.start, []).append(lp)
    kinds = [classify(i) for i in body]
    subs = {i.target for i in body if i.base == "CALL" and i.target is not None and i.target > body[-1].addr}
    skips_call = {}
    for n, ins in enumerate(body):
        if ins.base == "BRA" and ins.target is not None and ins.target > ins.addr and ins.target in index:
            # a guard around a slow-path call: the skipped code holds the call, no conditional branch (it is
            # no if/else or loop guard around a body that happens to hold one) and no loop
            skipped = range(n + 1, index[ins.target])
            skips_call[n] = (
                any(is_slow_call(body[b], subs) for b in skipped)
                and not any(body[b].base == "BRA" and body[b].guard for b in skipped)
                and not any(lp.start in skipped for lp in loops)
            )
    sb_ready = [0.0] * 6
    sb_kind = ["other"] * 6
    sb_from = [-1] * 6  # index of the instruction that set the pending time
    straight_waits: Counter = Counter()
    clock = 0.0  # earliest issue of the next instruction
    total = Cost()
    active: dict[int, Cost] = {}  # loop end -> cost so far
    trip_marks: dict[int, list[Cost]] = {}  # loop end -> cost at the end of each trip
    done: dict[int, int] = {}  # loop end -> trips completed (extrapolated ones included)
    exits = {lp.exit_at: lp for lp in loops if lp.exit_at is not None}
    by_tag: dict[str, Cost] = {}
    k = steps = 0
    while k < len(body):
        steps += 1
        if steps > 5_000_000:
            raise RuntimeError("timing model did not terminate")
        skip = next((lp for lp in starts.get(k, []) if lp.trips == 0 and lp.end not in active), None)
        if skip is not None:  # a loop that runs no trip (its guard branches around it)
            skip.cost = Cost()
            k = skip.end + 1
            continue
        for lp in starts.get(k, []):
            if lp.end not in active:
                active[lp.end] = Cost()
                trip_marks[lp.end] = [Cost()]
                done[lp.end] = 0
        ins, kind = body[k], kinds[k]
        t = clock
        blame, source = "other", -1
        for b in range(6):
            if ins.wait >> b & 1 and sb_ready[b] > t:
                t, blame, source = sb_ready[b], sb_kind[b], sb_from[b]
        step = Cost(float(max(1, ins.stall)))
        if t > clock:
            step.waits[blame] += t - clock
            if not active:
                straight_waits[source] += t - clock
        if ins.write_sb < 6 and t + latency_of(kind) >= sb_ready[ins.write_sb]:
            sb_ready[ins.write_sb], sb_kind[ins.write_sb], sb_from[ins.write_sb] = t + latency_of(kind), kind, k
        if ins.read_sb < 6 and t + LATENCY["read"] >= sb_ready[ins.read_sb]:
            sb_ready[ins.read_sb], sb_kind[ins.read_sb], sb_from[ins.read_sb] = t + LATENCY["read"], "read", k
        clock = t + max(1, ins.stall)
        if kind == "bar" and LATENCY["bar"] > max(1, ins.stall):
            step.waits["bar"] += LATENCY["bar"] - max(1, ins.stall)
            clock = t + LATENCY["bar"]
        total.add(step)
        for end, cost in active.items():
            if by_end[end].start <= k <= end:
                cost.add(step)
        if tags and tags[k]:
            by_tag.setdefault(tags[k], Cost()).add(step)
        if ins.base == "EXIT" and not ins.guard:
            break
        if k in exits and exits[k].end in active:  # a loop's exit from its body: taken on the last trip only
            lp = exits[k]
            if done[lp.end] >= (lp.trips or 1) - 1:
                lp.cost = active.pop(lp.end)
                del trip_marks[lp.end], done[lp.end]
                k = index[ins.target]
            else:
                k += 1
            continue
        if k in by_end and k in active:  # back branch of a loop being run
            lp = by_end[k]
            marks = trip_marks[k]
            marks.append(active[k].copy())
            exact = len(marks) - 1
            # trips through the back branch; a loop with an exit runs its last trip up to the exit
            want = (lp.trips or 1) - (1 if lp.exit_at is not None else 0)
            if done[k] < want:
                if exact < min(want, EXACT_TRIPS):
                    done[k] = exact
                    k = lp.start
                    continue
                if want > exact:  # steady state: the remaining trips at the last trip's cost
                    last = marks[-1].minus(marks[-2])
                    extra = want - exact
                    for end, cost in active.items():
                        if by_end[end].start <= lp.start and lp.end <= end:
                            cost.add(last, extra)
                    total.add(last, extra)
                    shift = extra * last.total
                    clock += shift
                    sb_ready = [v + shift for v in sb_ready]
                done[k] = want
                if lp.exit_at is not None:  # then the last trip, up to the exit
                    k = lp.start
                    continue
            lp.cost = active.pop(k)
            del trip_marks[k], done[k]
            k += 1
            continue
        if ins.base == "BRA" and ins.target is not None and ins.target > ins.addr:
            if not ins.guard or skips_call.get(k):
                k = index[ins.target]
                continue
        k += 1
    return total, by_tag, straight_waits


def static_cycles(ins_list: list[Instr]) -> float:
    """ptxas's stall cycles of ``ins_list``: its time if every scoreboarded result came at once."""
    return float(sum(max(1, i.stall) for i in ins_list))


def additive_cycles(ins_list: list[Instr]) -> float:
    """Pessimistic model: the stall cycles plus every scoreboarded instruction's full latency, one
    after the other, nothing overlapped."""
    total = static_cycles(ins_list)
    for ins in ins_list:
        kind = classify(ins)
        if ins.write_sb < 6 or kind == "bar":
            total += latency_of(kind)
    return total


# ----------------------------------------------------------------------------------------------
# Compilation: benchmarks/aot.py, the harness the compile tests use too
# ----------------------------------------------------------------------------------------------


def compile_kernel(fn, constexprs: dict, num_warps: int, arch: int, maxnreg: int | None = None) -> dict:
    """cubin, Triton's shared-memory size, resource usage and SASS (with lines) of one compilation."""
    return aot.compile_kernel(fn, constexprs, num_warps, arch, maxnreg=maxnreg, sass=True)


# ----------------------------------------------------------------------------------------------
# Jobs: kernel x configuration
# ----------------------------------------------------------------------------------------------
@dataclass
class Job:
    kernel: str  # function name
    config: str  # configuration name(s)
    shape: str
    constexprs: dict
    num_warps: int
    programs: int  # grid size of one call
    layers: int
    maxnreg: int | None = None  # ptxas register cap of the launch (SearchLaunch.maxnreg)
    run: SplitRun | None = None  # the data-dependent loop counts of the split kernel

    def variants(self) -> list[dict]:
        """The runtime assumptions of each simulation, as ``SOURCE_LOOPS`` reads them: none for a kernel
        without data-dependent loops; the split kernel twice, at its worst-case rounds (at least one) of
        ``k`` levels and ``k`` path steps, ``k`` = 2 then 1 (the difference is one more level of a round)."""
        if self.run is None:
            return [{}]
        rounds = max(1, self.run.rounds_max)
        return [dict(rounds=rounds, levels=k, path_steps=k) for k in (2, 1)]


@dataclass(frozen=True)
class SplitRun:
    """Loop counts of the split kernel on one deployment, measured on sampled steps of the real DeepSeek-V3
    loads: rounds per layer (mean and max), and the mean breadth-first levels of a round, over all rounds
    and over the rounds of the 5% of layers that need the most (the worst case's). A round whose target is
    at level ``k`` runs ``k`` levels and walks a path of ``k`` steps; a round that raises ``T`` instead runs
    its levels, a 64-bit division and no walk (modelled as an augmenting round)."""

    rounds_mean: float
    rounds_max: int
    levels: float
    levels_worst: float
    source: str


# DeepSeek-V3 deployments of the split kernel (E = 256), (config name, R, P) -> loop counts, measured on the
# steps of eplb_triton.bench_dispatch (tokens x top-8 drawn from each real load file of the deployment's kind,
# 256 to 65,536 tokens, two steps per size, the greedy placement of that file; 1,276 to 3,828 layers) through
# an instrumented copy of split._reference_layer (its rounds equal split.balanced_split's). The max rounds are
# docs/algorithm.md section 11's, from more steps (this sample's max in the source text).
SPLIT_RUNS = {
    ("prefill-EP32", 288, 32): SplitRun(
        6.5, 47, 1.64, 1.79, "rounds per layer mean 6.5 (5.6-7.1 by batch size; max 35 in this sample, 47 in "
        "docs/algorithm.md), 12% of them raise T; 1.64 levels per round, 1.79 in the layers with the most rounds"
    ),
    ("decode-EP64", 320, 64): SplitRun(
        6.1, 73, 1.46, 1.93, "rounds per layer mean 6.1 (5.1-7.2 by batch size; max 71 in this sample, 73 in "
        "docs/algorithm.md), 3% of them raise T; 1.46 levels per round, 1.93 in the layers with the most rounds"
    ),
    ("decode-EP144", 288, 144): SplitRun(
        0.1, 8, 1.0, 1.0, "rounds per layer mean 0.10 (max 3 in this sample, 8 in docs/algorithm.md), none "
        "raises T; every round 1 level"
    ),
}  # fmt: skip
SPLIT_GOAL_US = 10.0  # the project's goal per layer on sm_90


def jobs() -> list[Job]:
    from eplb_triton import launch
    from eplb_triton._validation import Config
    from eplb_triton.configs import DEEPSEEK_V3, MODELS

    shapes: dict[tuple, list[str]] = {}
    layers: dict[tuple, int] = {}
    for d in (*DEEPSEEK_V3.values(), *MODELS.values()):
        key = (d.experts, d.replicas, d.groups, d.nodes, d.gpus)
        shapes.setdefault(key, []).append(d.name)
        layers.setdefault(key, d.layers)
    for name, key in (("limits-hierarchical", (1024, 2048, 16, 4, 64)), ("limits-global", (1024, 2048, 1, 1, 128))):
        assert key[:2] == (launch.MAX_EXPERTS, launch.MAX_REPLICAS)
        shapes.setdefault(key, []).append(name)
        layers.setdefault(key, 58)
    out = []
    tokens, top_k = 8192, 8
    strided: set[int] = set()
    for key, names in shapes.items():
        E, R, G, N, P = key
        L = layers[key]
        cfg = Config(L, E, R, G, N, P)
        eff = cfg.effective()
        config = " = ".join(names)
        shape = f"E={E} R={R} G={G} N={N} P={P} ({cfg.policy}" + (
            ", runs G=N=1)" if (eff.num_groups, eff.num_nodes) != (G, N) else ")"
        )
        ln = launch.rebalance_launch(eff)
        out.append(Job("_rebalance_kernel", config, shape, ln.constexprs, ln.num_warps, ln.grid[0], L))
        ln = launch.replicate_launch(L, E, R)
        out.append(
            Job("_replicate_kernel", config, f"X={L} E={E} -> R={R}", ln.constexprs, ln.num_warps, ln.grid[0], L)
        )
        ln = launch.packing_launch(L, R, P)
        out.append(
            Job(
                "_balanced_packing_kernel",
                config,
                f"X={L} R={R} items -> P={P} packs",
                ln.constexprs,
                ln.num_warps,
                ln.grid[0],
                L,
            )
        )
        ln = launch.dispatch_launch(tokens * top_k, top_k, E)
        # The JIT turns an int argument equal to 1 into a constexpr: with contiguous log2phy [E, X], logcnt [E]
        # and counts [E] (what the balancer passes: one layer's rows) three of the four strides are 1.
        contiguous = dict(ln.constexprs, **DISPATCH_UNIT_STRIDES)
        shape = f"T={tokens} K={top_k} E={E}"
        out.append(Job("_record_dispatch_kernel", config, shape, contiguous, ln.num_warps, ln.grid[0], L))
        if E not in strided:  # the same kernel with every stride a runtime argument (views of wider tensors)
            strided.add(E)
            out.append(
                Job("_record_dispatch_kernel", f"{names[0]} (strided views)", f"{shape}, any strides", ln.constexprs,
                    ln.num_warps, ln.grid[0], L)
            )  # fmt: skip
        for name in names:
            run = SPLIT_RUNS.get((name, R, P))
            if run is not None and E == 256:
                ln = launch.split_launch(L, E, R, P, launch.log2phy_width(E, R))
                out.append(
                    Job("_balanced_split_kernel", config, f"L={L} E={E} R={R} P={P}", ln.constexprs, ln.num_warps,
                        ln.grid[0], L, ln.maxnreg, run)
                )  # fmt: skip
    return out


# Strides the JIT specialises to the constant 1 for contiguous rows (the int arguments of _record_dispatch_kernel
# equal to 1); stride_l2p_e = X (33 or 65 here) stays a runtime argument.
DISPATCH_UNIT_STRIDES = dict(stride_l2p_x=1, stride_cnt=1, stride_counts=1)


def kernel_functions() -> dict:
    from eplb_triton.kernels import _dispatch, _rebalance, _split

    return {
        "_rebalance_kernel": _rebalance._rebalance_kernel,
        "_replicate_kernel": _rebalance._replicate_kernel,
        "_balanced_packing_kernel": _rebalance._balanced_packing_kernel,
        "_record_dispatch_kernel": _dispatch._record_dispatch_kernel,
        "_balanced_split_kernel": _split._balanced_split_kernel,
    }


# ----------------------------------------------------------------------------------------------
# Analysis of one compilation
# ----------------------------------------------------------------------------------------------
@dataclass
class Analysis:
    res: dict
    shared: int
    instructions: int
    loops: list[Loop]  # SASS loops, then greedy loops the compiler unrolled completely
    cost: Cost  # whole program, timing model
    additive: float  # whole program, additive model (loops x trips + straight-line code once)
    spills: int  # LDL/STL instructions
    waits_by_line: list[tuple[str, str, float]]  # outside loops: (source line, class, cycles waited for it)


def _source_line(ins: Instr, lines: dict) -> str:
    """The innermost line of the kernel files in the instruction's inline chain, as source text."""
    for file, line in ins.chain:
        if (file, line) in lines:
            return f"{file}:{line} `{lines[(file, line)]}`"
    return "(no line)"


def _by_line(seg: list[Instr], lines: dict, top: int = 4) -> str:
    counts = Counter(_source_line(i, lines) for i in seg)
    return "; ".join(f"{100 * n / len(seg):.0f}% {text}" for text, n in counts.most_common(top))


def _exit_branch(body: list[Instr], lp: Loop, own: list[int], text: str | None, lines: dict) -> int | None:
    """Index of the conditional forward branch of ``lp``'s own instructions that leaves the loop and
    comes from the source line containing ``text`` (``SOURCE_LOOPS`` option ``exit``)."""
    if not text:
        return None
    after = body[lp.end].addr
    for k in own:
        ins = body[k]
        if ins.base == "BRA" and ins.guard and ins.target is not None and ins.target > after:
            if text in _source_line(ins, lines):
                return k
    return None


def analyse(compiled: dict, constexprs: dict, fors: list[SourceFor], lines: dict) -> Analysis:
    instrs = parse_cuobjdump_sass(compiled["sass"])
    attach_lines(instrs, compiled["lined"])
    body = main_function(instrs)
    loops = find_loops(body)
    ids = [loop_identity(i, fors, lines) for i in body]
    in_loop = set()
    for lp in loops:
        in_loop.update(range(lp.start, lp.end + 1))
    named_sass = set()
    identities: dict[int, tuple] = {}  # loop end -> its source loop
    for lp in sorted(loops, key=lambda lp: lp.end - lp.start):  # nested loops first
        n = loops.index(lp)
        # the loops nested in this one hold their own source loops: neither their instructions nor the
        # lines of those loops that the compiler placed around them vote for this one
        nested = [o for o in loops if o is not lp and lp.start <= o.start and o.end <= lp.end]
        inner = {k for o in nested for k in range(o.start, o.end + 1)}
        taken = {identities.get(o.end) for o in nested}
        own = [k for k in range(lp.start, lp.end + 1) if k not in inner]
        votes = Counter(ids[k] for k in own if ids[k] is not None and ids[k] not in taken)
        if votes:
            identity = votes.most_common(1)[0][0]
            identities[lp.end] = identity
            lp.name, lp.iterations = name_of(identity, constexprs)
            lp.exit_at = _exit_branch(body, lp, own, loop_options(lp.name).get("exit"), lines)
            if isinstance(lp.iterations, tuple):  # runtime bounds: (iterations, unrolling) from SOURCE_LOOPS
                lp.iterations, lp.unroll = lp.iterations
            lp.mapping = "line info"
            named_sass.add(identity)
        else:
            lp.name, lp.mapping = f"loop {n + 1}", "guess: no line info"
        seg = body[lp.start : lp.end + 1]
        lp.counts = Counter(COUNTED[i.base] if i.base in COUNTED else "other" for i in seg)
        lp.reductions = _reductions(seg)
        lp.by_line = _by_line(seg, lines)
        lp.trips = _counter_trips(body, lp)
        if lp.unroll:
            lp.trips = lp.iterations // lp.unroll
            lp.note = "runtime bounds: trips from the iterations (every weight > 0)"
        elif lp.iterations is not None and lp.name.split(":")[0] in SPLIT_LOOPS:
            lp.trips, lp.unroll = lp.iterations, 1
            lp.note = "data-dependent: iterations assumed (Job.variants, SPLIT_RUNS)"
            if lp.exit_at is not None:
                lp.note += f"; the last leaves at `{_source_line(body[lp.exit_at], lines).split('`')[1]}`"
        elif lp.iterations is not None and lp.trips:
            if lp.iterations % lp.trips == 0:
                lp.unroll = lp.iterations // lp.trips
            else:
                lp.note = f"trips {lp.trips} do not divide the {lp.iterations} iterations"
        elif lp.iterations is not None:
            lp.trips, lp.unroll = lp.iterations, 1
            lp.note = "loop counter not found: one iteration per trip assumed"
        if any(i.base == "CALL" and i.target is not None and i.target > body[-1].addr for i in seg):
            call = "the div_rn slow-path call" if any(i.base == "FCHK" for i in seg) else "a 64-bit division call"
            lp.note = (lp.note + "; " if lp.note else "") + f"holds {call} (not taken)"
    # additive model: a loop's own instructions and its nested loops' entries, times its trips (innermost first)
    for lp in sorted(loops, key=lambda lp: lp.end - lp.start):
        nested = [o for o in loops if o is not lp and lp.start <= o.start and o.end <= lp.end]
        inner = {k for o in nested for k in range(o.start, o.end + 1)}
        outermost = [o for o in nested if not any(x is not o and x.start <= o.start and o.end <= x.end for x in nested)]
        own = additive_cycles([body[k] for k in range(lp.start, lp.end + 1) if k not in inner])
        lp.additive = (own + sum(o.additive for o in outermost)) * (lp.trips if lp.trips is not None else 1)
    # greedy source loops present in the straight-line code only: fully unrolled by the compiler
    tags: list[str | None] = [None] * len(body)
    for identity in {ids[k] for k in range(len(body)) if k not in in_loop and ids[k] is not None}:
        name, iterations = name_of(identity, constexprs)
        if identity in named_sass or not iterations or iterations < 2 or not any(g in name for g in GREEDY):
            continue
        members = [k for k in range(len(body)) if k not in in_loop and ids[k] == identity]
        seg = [body[k] for k in members]
        for k in members:
            tags[k] = name
        loops.append(
            Loop(
                members[0],
                members[-1],
                name=name,
                mapping="line info",
                iterations=iterations,
                trips=1,
                unroll=iterations,
                counts=Counter(COUNTED[i.base] if i.base in COUNTED else "other" for i in seg),
                reductions=_reductions(seg),
                by_line=_by_line(seg, lines),
                additive=additive_cycles(seg),
                note="fully unrolled: straight-line code, no SASS loop",
                unrolled=len(seg),
            )
        )
    real = [lp for lp in loops if not lp.unrolled]
    cost, by_tag, straight_waits = simulate(body, real, tags)
    waits: Counter = Counter()
    for k, cycles in straight_waits.items():
        if k >= 0:
            waits[(_source_line(body[k], lines), classify(body[k]))] += cycles
    waits_by_line = [(text, kind, cycles) for (text, kind), cycles in waits.most_common()]
    for lp in loops:
        if lp.unrolled:
            lp.cost = by_tag.get(lp.name, Cost())
    straight_ins = [body[k] for k in range(len(body)) if k not in in_loop]
    top = [lp for lp in real if not any(o is not lp and o.start <= lp.start and lp.end <= o.end for o in real)]
    additive = additive_cycles(straight_ins) + sum(lp.additive for lp in top)
    res = aot.resources(compiled["usage"])
    spills = sum(1 for i in body if i.base in ("LDL", "STL"))
    return Analysis(res, compiled["shared"], len(body), loops, cost, additive, spills, waits_by_line)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------
CSV_FIELDS = [
    "label", "kernel", "config", "shape", "num_warps", "constexprs", "registers", "local_bytes", "stack_bytes",
    "ldl_stl", "shared_triton_bytes", "shared_static_bytes", "instructions", "row", "loop", "mapping", "body",
    "iterations", "trips", "unroll", "instr_per_iter", *[f"{c}_per_iter" for c in COUNT_COLUMNS], "reductions",
    "by_line", "cycles_per_iter", "cycles", "static", "wait_reduce", "wait_shared", "wait_global", "wait_other",
    "additive_cycles", "programs", "waves", "us", "note", "waits_by_line",
]  # fmt: skip
# Classes of the scoreboard waits, for the columns wait_<group>.
WAIT_GROUPS = {"reduce": ("shfl", "redux"), "shared": ("lds", "sts", "bar"), "global": ("ldg", "stg", "atom", "local")}


def _cost_columns(cost: Cost) -> dict:
    out = {"cycles": round(cost.total), "static": round(cost.static)}
    grouped = {k for g in WAIT_GROUPS.values() for k in g}
    for group, kinds in WAIT_GROUPS.items():
        out[f"wait_{group}"] = round(sum(cost.waits.get(k, 0.0) for k in kinds))
    out["wait_other"] = round(sum(v for k, v in cost.waits.items() if k not in grouped))
    return out


def waves(programs: int, num_warps: int) -> int:
    """Rounds of programs when each SM runs ``4 // num_warps`` programs at full single-warp speed (one
    warp per scheduler; a latency-bound program gains little from sharing a scheduler)."""
    per_sm = max(1, 4 // num_warps)
    return -(-programs // (NUM_SMS * per_sm))


def call_us(cycles: float, programs: int, num_warps: int) -> float:
    return waves(programs, num_warps) * cycles / (CLOCK_GHZ * 1e3) + LAUNCH_US


@dataclass
class SplitEstimate:
    """The split kernel's program from its two simulations (``Job.variants``): set-up (everything outside
    the rounds, step 5 included), a round of one level and one path step, and each further level with its
    path step. Linear in the rounds and levels, as the simulation itself is past its first EXACT_TRIPS trips."""

    setup: Cost
    round1: Cost  # a round of one level and one path step
    extra: Cost  # one more level and path step
    level: float  # cycles per breadth-first level (at two levels a round)
    step: float  # cycles per path step (at two steps a round)
    setup_additive: float
    round1_additive: float
    extra_additive: float

    def round(self, levels: float) -> Cost:
        out = self.round1.copy()
        out.add(self.extra, levels - 1)
        return out

    def program(self, rounds: float, levels: float) -> Cost:
        out = self.setup.copy()
        out.add(self.round(levels), rounds)
        return out

    def additive(self, rounds: float, levels: float) -> float:
        return self.setup_additive + rounds * (self.round1_additive + (levels - 1) * self.extra_additive)


def split_estimate(job: Job, a2: Analysis, a1: Analysis | None) -> SplitEstimate | None:
    """From the split kernel's simulations at two levels (``a2``) and one level (``a1``) a round; ``None``
    for another kernel or if a rounds loop is missing."""
    if job.run is None or a1 is None:
        return None
    loops2 = {lp.name.split(":")[0]: lp for lp in a2.loops}
    loops1 = {lp.name.split(":")[0]: lp for lp in a1.loops}
    r2, r1 = loops2.get("split rounds"), loops1.get("split rounds")
    if r2 is None or r1 is None or r2.cost is None or r1.cost is None:
        return None
    n = job.variants()[0]["rounds"]
    round1, round2 = Cost(), Cost()
    round1.add(r1.cost, 1 / n)
    round2.add(r2.cost, 1 / n)

    def per(name: str, trips: int) -> float:
        lp = loops2.get(name)
        return lp.cost.total / trips if lp is not None and lp.cost is not None else float("nan")

    return SplitEstimate(
        a2.cost.minus(r2.cost), round1, round2.minus(round1), per("split search", 2), per("split path walk", 2),
        a2.additive - r2.additive, r1.additive / n, (r2.additive - r1.additive) / n,
    )  # fmt: skip


def _cycles_us(cycles: float) -> str:
    return f"{cycles:,.0f} / {cycles / (CLOCK_GHZ * 1e3):.1f}"


def rows_of(label: str, job: Job, a: Analysis, a1: Analysis | None = None) -> list[dict]:
    """CSV rows of one job: the whole program, then its loops. ``a1``: the split kernel's simulation at one
    level a round (``Job.variants``), with which its rows are at the mean rounds and levels."""
    base = dict(
        label=label,
        kernel=job.kernel,
        config=job.config,
        shape=job.shape,
        num_warps=job.num_warps,
        constexprs=" ".join(f"{k}={v}" for k, v in job.constexprs.items()),
        registers=a.res.get("REG", ""),
        local_bytes=a.res.get("LOCAL", 0),
        stack_bytes=a.res.get("STACK", 0),
        ldl_stl=a.spills,
        shared_triton_bytes=a.shared,
        shared_static_bytes=a.res.get("SHARED", 0),
        instructions=a.instructions,
        programs=job.programs,
    )
    note = ""
    if "WIDTH" in job.constexprs:  # the fused kernel writes all of log2phy [L, E, WIDTH] int64 every call
        c = job.constexprs
        mb = job.layers * c["E"] * c["WIDTH"] * 8 / 1e6
        note = f"writes {mb:.1f} MB of log2phy per call: >= {mb / HBM_TBPS:.1f} us at {HBM_TBPS} TB/s (not modelled)"
    waited = "; ".join(f"{c:.0f} cycles on {kind} {text}" for text, kind, c in a.waits_by_line[:8] if c >= 20)
    cost, additive = a.cost, a.additive
    split = split_estimate(job, a, a1)
    if split is not None:  # the program at the mean rounds; the worst case in the note
        run = job.run
        cost, additive = split.program(run.rounds_mean, run.levels), split.additive(run.rounds_mean, run.levels)
        worst = split.program(run.rounds_max, run.levels_worst).total
        note = (
            f"data-dependent: at the mean of {run.rounds_mean:g} rounds per layer of {run.levels:g} levels and "
            f"path steps each ({run.source}); set-up {_cycles_us(split.setup.total)} cycles / us, per round "
            f"{_cycles_us(split.round(run.levels).total)}; worst ({run.rounds_max} rounds of "
            f"{run.levels_worst:g} levels) {_cycles_us(worst)} cycles / us per layer"
        )
    total = dict(
        base,
        row="total",
        waits_by_line=waited,
        loop="(whole program)",
        **_cost_columns(cost),
        additive_cycles=round(additive),
        waves=waves(job.programs, job.num_warps),
        us=round(call_us(cost.total, job.programs, job.num_warps), 1),
        note=note,
        split=split,
        run=job.run,
    )
    out = [total]
    for lp in a.loops:
        if lp.iterations == 0:  # a loop this configuration never enters (_pack_sorted's last steps)
            continue
        n = lp.iterations or 0
        u = lp.unroll or 1
        cost = lp.cost or Cost()
        loop_additive, note = lp.additive, lp.note
        if split is not None and lp.name.startswith("split rounds"):  # all rounds of a layer, at the mean
            n = job.run.rounds_mean
            cost = split.program(n, job.run.levels).minus(split.setup)
            loop_additive = split.additive(n, job.run.levels) - split.setup_additive
        elif split is not None:  # a loop inside a round: its cycles are one round's of two levels
            note += "; cycles: one round's of 2 levels"
        out.append(
            dict(
                base,
                row="loop",
                loop=lp.name,
                mapping=lp.mapping,
                body=lp.size,
                iterations=f"{n:g}" if split is not None else (lp.iterations or ""),
                trips="-" if lp.unrolled else (f"{n:g}" if split is not None else (lp.trips or "")),
                unroll=lp.unroll or "",
                instr_per_iter=round(sum(lp.counts.values()) / u, 1),
                **{f"{c}_per_iter": round(lp.counts.get(c, 0) / u, 2) for c in COUNT_COLUMNS},
                reductions=lp.reductions,
                by_line=lp.by_line,
                **_cost_columns(cost),
                additive_cycles=round(loop_additive),
                cycles_per_iter=round(cost.total / n, 1) if n else "",
                note=note,
            )
        )
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k, "") for k in CSV_FIELDS})


def read_labels(out: Path) -> dict[str, list[dict]]:
    """Rows of every ``kernel_report-<label>.csv`` in ``out``, by label (baseline first)."""
    labels = {}
    for path in sorted(out.glob("kernel_report-*.csv"), key=lambda p: (p.stem != "kernel_report-baseline", p.stem)):
        with path.open() as f:
            rows = list(csv.DictReader(f))
        if rows:
            labels[rows[0]["label"]] = rows
    return labels


def provenance(arch: int) -> dict[str, str]:
    import torch
    import triton

    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=HERE, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "?"

    ptxas = subprocess.run([str(aot.tools() / "ptxas"), "--version"], capture_output=True, text=True).stdout
    dirty = git("status", "--porcelain", "--", "../kernels", "../eplb_triton/launch.py")
    return {
        "target": f"sm_{arch}, compiled ahead of time on a CPU-only machine (no GPU involved)",
        "triton": triton.__version__,
        "ptxas": (re.findall(r"release [^\n]*", ptxas) or ["?"])[0],
        "torch": torch.__version__,
        "commit": git("rev-parse", "--short", "HEAD") + (" + uncommitted changes to the kernels" if dirty else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def _short(kernel: str) -> str:
    return kernel.strip("_").removesuffix("_kernel")


HEADLINE = {"prefill-EP32": "DeepSeek-V3 prefill EP32", "decode-EP144": "DeepSeek-V3 decode EP144"}
EXPLAINED = {**HEADLINE, "limits-hierarchical": "limits, hierarchical", "limits-global": "limits, global"}


def _rows_for(rows: list[dict], kernel: str, config_name: str) -> tuple[dict | None, list[dict]]:
    mine = [r for r in rows if r["kernel"] == kernel and config_name in r["config"].split(" = ")]
    total = next((r for r in mine if r["row"] == "total"), None)
    return total, [r for r in mine if r["row"] == "loop"]


def _describe_reduction(loop: dict) -> str:
    """One sentence on how a greedy step is reduced across lanes, read from the loop's SASS counts."""
    red = loop["reductions"]
    u = float(loop["unroll"] or 1)
    parts = []
    for op in ("MAX", "MIN"):
        if f"REDUX.{op}.S32" in red:
            parts.append(
                f"a 64-bit {op.lower()} over the whole warp is two dependent REDUX: REDUX.{op}.S32 on the high words, "
                f"then REDUX.{op} (unsigned) on the low words of the lanes whose high word won (the others "
                f"select {'0' if op == 'MAX' else '0xffffffff'})"
            )
    offsets = sorted({int(x, 16) for x in re.findall(r"SHFL\.BFLY\[(0x[0-9a-f]+)\]", red)}, reverse=True)
    if offsets:
        shfl = float(loop["shfl_per_iter"])
        parts.append(
            f"a butterfly of SHFL.BFLY with offsets {', '.join(map(str, offsets))} ({shfl:g} SHFL per step: both "
            f"32-bit halves of the key at each level, then a 64-bit compare ISETP.U32 + ISETP.EX and two SEL)"
        )
    if float(loop["bar_per_iter"]):
        parts.append(
            f"across warps, each warp's partial result goes through shared memory: {float(loop['sts_per_iter']):g} "
            f"STS, {float(loop['bar_per_iter']):g} BAR.SYNC, {float(loop['lds_per_iter']):g} LDS per step"
        )
    if float(loop["ldg_per_iter"]):
        parts.append(f"{float(loop['ldg_per_iter']):g} global load(s) per step")
    head = f"{loop['instr_per_iter']} SASS instructions per step"
    if u > 1 and loop["trips"] != "-":
        head += f" (the body of {loop['body']} instructions holds {int(u)} steps)"
    elif loop["trips"] == "-":
        head += f" (fully unrolled: {loop['body']} straight-line instructions for {loop['iterations']} steps)"
    return head + ("; " + "; ".join(parts) if parts else "; no cross-lane instruction") + "."


PARTS = {
    "static": "ptxas stall cycles",
    "wait_reduce": "SHFL/REDUX waits",
    "wait_shared": "shared memory / barrier waits",
    "wait_global": "global memory waits",
    "wait_other": "other waits",
}


def _verdict(r: dict) -> str:
    """The largest part of an estimate and its share."""
    total = float(r["cycles"] or 0)
    if not total:
        return "-"
    part = max(PARTS, key=lambda p: float(r[p] or 0))
    return f"{PARTS[part]} ({100 * float(r[part]) / total:.0f}%)"


def _per(r: dict, key: str) -> str:
    n = float(r["iterations"] or 0)
    return f"{float(r[key]) / n:.0f}" if n else "-"


def compared(labels: dict[str, list[dict]], label: str) -> list[dict]:
    """The rows of the comparison across labels: every whole program, and the fused kernel's loops. Rows of
    two labels are the same entry when kernel and loop match and their configurations share a name (a
    deployment added to a shape renames its configuration, e.g. ``decode-EP64`` to ``decode-EP64 =
    deepseek-v3-decode-ep64``); an entry shows the configuration as ``label`` names it, else as last named.
    Entries come in the order of the first label, then any new ones."""
    entries: list[dict] = []
    for name in labels:
        for r in labels[name]:
            if r["row"] != "total" and r["kernel"] != "_rebalance_kernel":
                continue
            names = set(r["config"].split(" = "))
            entry = next(
                (e for e in entries if (e["kernel"], e["loop"]) == (r["kernel"], r["loop"]) and e["names"] & names
                 and name not in e["rows"]),
                None,
            )  # fmt: skip
            if entry is None:
                entry = {"kernel": r["kernel"], "loop": r["loop"], "names": set(), "config": r["config"], "rows": {}}
                entries.append(entry)
            entry["names"] |= names
            entry["rows"][name] = r
            if name == label or label not in entry["rows"]:
                entry["config"] = r["config"]
    return entries


def split_section(rows: list[dict]) -> list[str]:
    """The split kernel's section: set-up, a round, and a layer at the mean and the worst rounds."""
    mine = [r for r in rows if r["kernel"] == "_balanced_split_kernel" and r["row"] == "total" and r.get("split")]
    if not mine:
        return []
    L = ["## The per-step balanced split: cycles per layer", ""]
    L += [
        "`_balanced_split_kernel` (docs/algorithm.md section 11) runs one program per layer: a set-up (the "
        "slots sorted by expert, the even split, the tiles, the bound `T`), then rounds of step 4 while a GPU "
        "is above `T`, each a breadth-first search of the residual graph level by level and a walk back along "
        "the augmenting path, then step 5 (the slots' quotas). Its loop counts depend on the data, so the "
        "report takes them from measurements (`SPLIT_RUNS`): rounds per layer and levels per round on the "
        "steps `eplb_triton.bench_dispatch` samples from the real DeepSeek-V3 loads (256 to 65,536 tokens x "
        "top-8); a round whose target lies at level k runs k levels and walks k path steps. The SASS is "
        "simulated twice, with rounds of one and of two levels (the level loop's last trip leaves at "
        "`if code < NEW_ONLY:`, the target); the model is linear in rounds and levels past the first trips, so "
        "a layer is `set-up + rounds x (round of 1 level + (levels - 1) x further level)`. The worst case "
        "takes the most rounds seen with the levels per round of the layers that need the most rounds. "
        "Launched as `eplb_triton.launch.split_launch(L, E, R, P, R - E + 1)`; `us` at the boost clock, per "
        "program, without the launch.",
        "",
    ]
    table = []
    for r in mine:
        split, run = r["split"], r["run"]
        per_round = split.round(run.levels).total
        mean = split.program(run.rounds_mean, run.levels).total
        worst = split.program(run.rounds_max, run.levels_worst).total
        goal = mean / (CLOCK_GHZ * 1e3)
        table.append(
            [
                r["config"],
                r["shape"],
                f"{r['num_warps']} / {r['registers']} / {r['local_bytes']}",
                _cycles_us(split.setup.total),
                f"{split.level:,.0f} / {split.step:,.0f}",
                f"{split.round1.total:,.0f} + {split.extra.total:,.0f}",
                f"{run.levels:g}: {_cycles_us(per_round)}",
                f"{run.rounds_mean:g}: {_cycles_us(mean)}",
                f"{run.rounds_max} x {run.levels_worst:g}: {_cycles_us(worst)}",
                ("yes" if goal <= SPLIT_GOAL_US else f"no ({goal / SPLIT_GOAL_US:.1f}x)"),
            ]
        )
    L += _table(
        [
            "deployment",
            "shape",
            "warps / regs / spill B",
            "set-up: cycles / us",
            "cycles per search level / path step",
            "round of 1 level + each further level: cycles",
            "mean round: levels: cycles / us",
            "layer, mean: rounds: cycles / us",
            "layer, worst: rounds x levels: cycles / us",
            f"mean layer <= {SPLIT_GOAL_US:g} us",
        ],
        table,
    )
    L += [""]
    for r in mine:
        split, run = r["split"], r["run"]
        parts = ", ".join(
            f"{PARTS[p]} {100 * v / split.setup.total:.0f}%"
            for p, v in _cost_columns(split.setup).items()
            if p in PARTS and v > 0
        )
        one = split.round(1)
        round_parts = ", ".join(
            f"{PARTS[p]} {100 * v / one.total:.0f}%" for p, v in _cost_columns(one).items() if p in PARTS and v > 0
        )
        L.append(
            f"- {r['config']}: {run.source}. Set-up: {parts}; a round of one level: {round_parts}."
            + (f" Waits of the set-up by source line: {r['waits_by_line']}." if r["waits_by_line"] else "")
        )
    L += [
        "",
        "Not modelled: a round that raises `T` instead of augmenting (its last level finds no new GPU; it walks "
        "no path but divides two int64 in a subroutine the model does not enter) is costed as an augmenting "
        "round; the tiles are processed whole every level, so a level's cost does not depend on its frontier. "
        "All layers of a step run in parallel (one program each, one wave), so a call of all layers takes about "
        "its slowest layer plus the launch; a call per layer (`OnlineBalancer.record` with "
        "`split='balanced'`) takes its layer plus the launch.",
        "",
    ]
    return L


def dispatch_section(rows: list[dict]) -> list[str]:
    """Record + dispatch: the kernel as the JIT builds it for contiguous rows, and for any strides."""
    dispatch = [r for r in rows if r["kernel"] == "_record_dispatch_kernel" and r["row"] == "total"]
    strided = {r["shape"].split(",")[0]: r for r in dispatch if "any strides" in r["shape"]}
    pairs = []
    for r in dispatch:
        other = strided.get(r["shape"])
        if other is not None and r is not other and all(p[0]["shape"] != r["shape"] for p in pairs):
            pairs.append((r, other))
    if not pairs:
        return []
    units = ", ".join(f"`{k}`" for k in DISPATCH_UNIT_STRIDES)
    L = ["## Record + dispatch: strides", ""]
    L += [
        "`_record_dispatch_kernel` reads `log2phy` and `logcnt` and accumulates `counts` through four int "
        "strides. Triton's JIT specialises an int argument equal to 1 as a constant, so for contiguous rows "
        f"(what `OnlineBalancer` passes: one layer of `log2phy [L, E, X]`, `logcnt [L, E]`, `counts [L, E]`) "
        f"{units} are compiled in as 1 and only `stride_l2p_e` (= X) stays an argument: the `record_dispatch` "
        "rows of this report are that kernel. Views with other strides (e.g. a column of a wider `counts`) get "
        "the kernel with every stride an argument (`strided views`, once per E). "
        "(The JIT also marks an int divisible by 16, such as `n_entries` = T x K here, `tt.divisibility=16`; "
        "the AOT harness marks only the pointers, so these rows are for a `n_entries` without that hint.)",
        "",
    ]
    L += _table(
        ["E", "contiguous rows: est. cycles / regs / SASS instr.", "strided views: est. cycles / regs / SASS instr."],
        [
            [
                a["constexprs"].split()[0].removeprefix("E="),
                f"{int(a['cycles']):,} / {a['registers']} / {a['instructions']}",
                f"{int(b['cycles']):,} / {b['registers']} / {b['instructions']}",
            ]
            for a, b in pairs
        ],
    )
    return L + [""]


def write_markdown(path: Path, label: str, rows: list[dict], labels: dict[str, list[dict]], prov: dict) -> None:
    arch = prov["target"].split()[0].rstrip(",")
    L = [f"# Static cost report of the Triton kernels ({arch})", ""]
    L += [
        "Generated by `python benchmarks/kernel_report.py`; do not edit by hand. Every number comes from the "
        "cubin that Triton builds for the target with the constexprs, `num_warps` and `maxnreg` of "
        "`eplb_triton.launch.*_launch`, i.e. what runs. Registers, spills, shared memory and instruction "
        "counts are exact for this toolchain. **Cycles and microseconds are rough, order-of-magnitude "
        "estimates from a simple latency model (last section), not measurements**: trust ratios between "
        "rows more than absolute values, and replace them with `benchmarks/gpu_check.py` timings when a GPU "
        "is available.",
        "",
        "## Provenance",
        "",
    ]
    L += [f"- {k}: {v}" for k, v in prov.items()] + [f"- label of this run (detailed sections): `{label}`", ""]

    # headline
    L += ["## Headline: the fused rebalance kernel, DeepSeek-V3 prefill EP32 and decode EP144", ""]
    head = []
    for key, title in HEADLINE.items():
        total, loops = _rows_for(rows, "_rebalance_kernel", key)
        if total is None:
            continue
        bodies = "; ".join(
            f"{lp['loop'].split(':')[0]}: {lp['body']}"
            + (" (unrolled)" if lp["trips"] == "-" else f" x{lp['trips']} trips")
            + f", {lp['iterations']} iterations at {lp['cycles_per_iter']} cycles"
            for lp in loops
        )
        cycles = int(total["cycles"])
        in_loops = sum(int(lp["cycles"]) for lp in loops)
        head.append(
            [
                title,
                total["shape"],
                total["num_warps"],
                total["registers"],
                total["local_bytes"],
                total["shared_triton_bytes"],
                bodies,
                f"{in_loops:,}",
                f"{cycles:,}",
                f"{int(total['additive_cycles']):,}",
                f"{cycles / (CLOCK_GHZ * 1e3):.1f}",
                f"{total['programs']} / {total['waves']}",
                total["us"],
            ]
        )
    L += _table(
        [
            "deployment",
            "shape (policy)",
            "warps",
            "regs",
            "spill B",
            "shared B",
            "loops: SASS body (instructions), trips, iterations at est. cycles each",
            "est. cycles in loops",
            "est. cycles / program",
            "additive bound",
            "us / program",
            "programs / waves",
            "est. us / call",
        ],
        head,
    )
    L += [
        "",
        f"`est. us / call` = waves x cycles / {CLOCK_GHZ} GHz + {LAUNCH_US:g} us launch overhead (assumed). The "
        f"programs (58 layers x N nodes) run in parallel across the {NUM_SMS} SMs of an H100 SXM / H200; with "
        "`num_warps` warps a program holds `num_warps` of an SM's four schedulers, so up to `4 // num_warps` "
        f"programs per SM run at full single-warp speed; waves = ceil(programs / ({NUM_SMS} x 4 // num_warps)). "
        "Every program of a call runs the same critical path (the same loop counts; the slot packing's assume "
        "every load > 0, a row with zero loads takes up to P/N - 1 more steps), so a call takes about one "
        "program's path per wave. The 'additive bound' serialises every latency (see the model) and is an upper "
        "estimate.",
        "",
    ]

    L += split_section(rows)
    L += dispatch_section(rows)

    # reductions in prose
    L += ["## How a greedy step is reduced across lanes", ""]
    L += [
        "Each greedy step is a reduction over int64 selection keys: in the replication one `tl.max` (the expert "
        "with the largest share); in the group packing one `tl.max` (the heaviest group left) and one `tl.min` "
        "(the least-loaded open node). The slot packing (`_pack_sorted`) takes its items in an order that does "
        "not depend on the GPUs, so it sorts them once (`tl.sort`: a bitonic network, compare-exchanges inside "
        "each thread and SHFL.BFLY between lanes), places the first round (item k on GPU k while the loads are "
        "> 0) without any step, and streams the other items from scratch, four per loop trip, each trip's four "
        "loaded during the previous trip: a step is then only one `tl.min` over the GPUs' keys, spread over at "
        "least the 32 lanes of the warp. A block of keys is spread over "
        "the threads of the program, several per thread; Triton reduces first inside each thread (a chain of "
        "64-bit compares, ISETP.U32 + ISETP.EX + two SEL per key, a tree or a short chain in the SASS), "
        "then across the lanes of a warp, then (with more than one warp) across warps through shared memory. "
        "What the SASS of each configuration actually does per step:",
        "",
    ]
    for key, title in EXPLAINED.items():
        total, loops = _rows_for(rows, "_rebalance_kernel", key)
        if total is None:
            continue
        L += [f"**{title}** ({total['shape']}, {total['num_warps']} warp(s), {total['constexprs']}):", ""]
        for lp in loops:
            if any(g in lp["loop"] for g in GREEDY):
                L.append(f"- {lp['loop']} ({lp['iterations']} steps): {_describe_reduction(lp)}")
                L.append(f"  Instructions of the step by source line: {lp['by_line']}.")
        L.append("")

    # what dominates
    L += ["## What dominates the estimate", ""]
    L += [
        "The model's cycles split into ptxas's stall cycles (the fixed-latency schedule: dependent ALU chains and "
        "pipe throughput, what the step would cost if every shuffle, warp reduction and load answered at once) "
        "and the extra cycles the warp waits on a scoreboard, by class of the instruction waited for. Per greedy "
        "step of the fused kernel:",
        "",
    ]
    dom = []
    for r in rows:
        if r["kernel"] == "_rebalance_kernel" and r["row"] == "loop" and any(g in r["loop"] for g in GREEDY):
            dom.append(
                [
                    r["config"],
                    r["loop"].split(":")[0],
                    r["iterations"],
                    r["instr_per_iter"],
                    r["cycles_per_iter"],
                    _per(r, "static"),
                    _per(r, "wait_reduce"),
                    _per(r, "wait_shared"),
                    _per(r, "wait_global"),
                    _per(r, "wait_other"),
                    f"{int(r['cycles']):,}",
                    _verdict(r),
                ]
            )
    L += _table(
        [
            "configuration",
            "loop",
            "steps",
            "instr / step",
            "est. cycles / step",
            "stall cycles / step",
            "SHFL/REDUX waits / step",
            "shared/BAR waits / step",
            "global waits / step",
            "other waits / step",
            "est. cycles, all steps",
            "largest part",
        ],
        dom,
    )
    inner = [
        f"{_short(r['kernel'])} {r['config']} {r['loop'].split(':')[0]} ({r['ldg_per_iter']} per step)"
        for r in rows
        if r["row"] == "loop" and any(g in r["loop"] for g in GREEDY) and float(r["ldg_per_iter"]) > 0
    ]
    L += [
        "",
        "Global loads (LDG) inside the greedy loops, any kernel: "
        + ("; ".join(inner) if inner else "none")
        + ". (The packings' LDG are `_pack_sorted`'s streamed items, weight and index, loaded one loop trip "
        "before their use, so the model finds no wait on them; the LDS of the 4-warp configurations are the "
        "cross-warp reduction's shared-memory exchange.)",
    ]
    L += ["", "Whole program, and the share of each loop:", ""]
    for key, title in HEADLINE.items():
        total, loops = _rows_for(rows, "_rebalance_kernel", key)
        if total is None:
            continue
        whole = float(total["cycles"])
        split = ", ".join(f"{PARTS[p]} {100 * float(total[p]) / whole:.0f}%" for p in PARTS if float(total[p]))
        parts = [f"{lp['loop'].split(':')[0]} {100 * float(lp['cycles']) / whole:.0f}%" for lp in loops]
        rest = whole - sum(float(lp["cycles"]) for lp in loops)
        L.append(
            f"- {title}, {int(whole):,} cycles: {split}. By loop: "
            + ", ".join(parts)
            + f", the rest (row loads, validity, group loads, output stores) {100 * rest / whole:.0f}%."
            + (f" It also {total['note']}." if total["note"] else "")
        )
        if total["waits_by_line"]:
            L.append(f"  Waits outside the loops, by the source line of the instruction waited for: "
                     f"{total['waits_by_line']}.")  # fmt: skip
    L += [""]

    # comparison across labels
    L += ["## Before / after", ""]
    L += [
        "One column per label found next to this file (`kernel_report-<label>.csv`): `baseline` first, this "
        "run's last, the others by name. After a change to the kernels, `python benchmarks/kernel_report.py "
        "--label <name>` adds a column here and to `kernel_report.csv`. Whole-program cells: estimated cycles "
        "per program / registers / SASS instructions (the split kernel's at its mean rounds); loop cells (fused "
        "kernel): estimated cycles per iteration / SASS body. A row is one kernel, configuration and loop across "
        "labels even where a later deployment renamed its configuration (`decode-EP64` became `decode-EP64 = "
        "deepseek-v3-decode-ep64`).",
        "",
    ]
    names = [name for name in labels if name != label] + [label]

    def cell(r: dict) -> str:
        if r["row"] == "total":
            return f"{int(r['cycles']):,} / {r['registers']} / {r['instructions']}"
        return f"{r['cycles_per_iter']} / {r['body']}"

    comp = []
    for entry in compared(labels, label):
        loop = entry["loop"]
        where = "whole program" if loop == "(whole program)" else loop.split(":")[0]
        line = [_short(entry["kernel"]), entry["config"], where]
        comp.append(line + [cell(entry["rows"][name]) if name in entry["rows"] else "-" for name in names])
    L += _table(["kernel", "configuration", "loop", *names], comp) + [""]

    # resources
    L += ["## Resources per kernel and configuration", ""]
    res = []
    for r in rows:
        if r["row"] == "total":
            res.append(
                [
                    _short(r["kernel"]),
                    r["config"],
                    r["shape"],
                    r["num_warps"],
                    r["registers"],
                    r["local_bytes"],
                    r["ldl_stl"],
                    r["shared_triton_bytes"],
                    r["shared_static_bytes"],
                    r["instructions"],
                    f"{int(r['cycles']):,}",
                    f"{int(r['additive_cycles']):,}",
                    f"{r['programs']} / {r['waves']}",
                    r["us"],
                ]
            )
    L += _table(
        [
            "kernel",
            "configuration",
            "shape",
            "warps",
            "regs",
            "local B",
            "LDL/STL",
            "shared B (Triton)",
            "shared B (cuobjdump)",
            "SASS instr.",
            "est. cycles",
            "additive",
            "programs / waves",
            "est. us / call",
        ],
        res,
    )
    L += [
        "",
        "Configurations with the same shape are one row (`a = b`). The standalone kernels are shown at the shape "
        "each configuration gives them: `replicate` E experts onto R slots, `balanced_packing` R items onto P "
        "packs, `record_dispatch` 8192 tokens x top-8 (its grid; the code depends on E only; contiguous rows, "
        "and once per E with every stride a runtime argument: `strided views`), `balanced_split` one program per "
        "layer at the mean rounds of its section above. `local B` is "
        "local memory (spills; `LDL/STL` counts the instructions); `shared B (Triton)` is the dynamic shared "
        "memory Triton requests (reduction scratch); `shared B (cuobjdump)` is the static figure, which on "
        "sm_90 includes the 1 KiB the driver reserves per block. `est. us / call` as in the headline.",
        "",
    ]

    # loops
    L += ["## Loops in the SASS", ""]
    L += [
        "A loop is a backward `BRA`; its body runs from the branch target to the branch (`body`: SASS "
        "instructions). `mapping: line info` means the loop was tied to its source loop through the inline "
        "chain of the cubin's line table (it tells the group packing from the slot packing): not a guess. "
        "`trips` is read from the SASS loop counter, `unroll` = iterations / trips, and the op counts are per "
        "source iteration (body counts / unroll). Greedy loops the compiler unrolled completely have no SASS "
        "loop (`trips` -): their straight-line instructions are counted instead, and their cycles are the span "
        "of those instructions in the simulation.",
        "",
    ]
    loops = []
    for r in rows:
        if r["row"] == "loop":
            loops.append(
                [
                    _short(r["kernel"]),
                    r["config"],
                    r["num_warps"],
                    r["loop"],
                    r["mapping"],
                    r["body"],
                    r["iterations"],
                    r["trips"],
                    r["unroll"],
                    r["instr_per_iter"],
                    *[r[f"{c}_per_iter"] for c in COUNT_COLUMNS],
                    r["cycles_per_iter"],
                    f"{int(r['cycles']):,}",
                    r["note"],
                ]
            )
    L += _table(
        [
            "kernel",
            "configuration",
            "warps",
            "loop",
            "mapping",
            "body",
            "iterations",
            "trips",
            "unroll",
            "instr / iter",
            "SHFL",
            "BAR",
            "REDUX",
            "LDS",
            "STS",
            "LDG",
            "STG",
            "ATOM/RED",
            "LDL/STL",
            "est. cycles / iter",
            "est. cycles",
            "note",
        ],
        loops,
    )
    L += ["", "Cross-lane instructions in each distinct loop body (per SASS trip):", ""]
    seen = set()
    for r in rows:
        if r["row"] == "loop" and r["reductions"]:
            key = (r["kernel"], r["shape"], r["loop"])
            if key not in seen:
                seen.add(key)
                L.append(f"- `{_short(r['kernel'])}` {r['config']}, {r['loop']}: {r['reductions']}")
    L += [""]
    L += MODEL_TEXT
    path.write_text("\n".join(L) + "\n")


MODEL_TEXT = [
    "## Latency model",
    "",
    "`simulate` walks one warp through the SASS in program order along the path a valid row takes, using "
    "the schedule ptxas wrote into each instruction's control bits: the next instruction issues `stall` "
    "cycles later (ptxas sets the stall counts from its own fixed latencies and pipe rates for the target: "
    "e.g. 2 between independent INT32 instructions of one warp, 4-5 before a dependent one), and no earlier "
    "than the scoreboards in its wait mask are released. Only the scoreboarded (variable-latency) "
    "instructions need a latency from outside, the table below; a barrier costs its latency. Loops run the "
    f"trip count read from their counter (the first {EXACT_TRIPS} trips exactly, the others at the last "
    "trip's cost), or the assumed count of a data-dependent loop (the split kernel's; a loop that stops at "
    "a target leaves from its body on its last trip); forward branches fall through, except around a "
    "slow-path call (the `div_rn` slow path, taken only for subnormal or special operands). With several "
    "warps each warp runs the same code on its own scheduler, "
    "so one warp's path is the program's path; the barriers tie them together. In short: cycles = ptxas "
    "stall cycles on the path + the waits for SHFL / REDUX / LDS / LDG results beyond them.",
    "",
    "| scoreboarded instruction | latency (cycles) | basis |",
    "|---|---|---|",
    f"| SHFL | {LATENCY['shfl']} | ~23-30: Jia et al. 2018 (Volta), 2019 (Turing); Luo et al. 2024 (Hopper) |",
    f"| REDUX (sm_80+ warp reduction into a uniform register) | {LATENCY['redux']} | no published figure found: "
    "assumed equal to SHFL |",
    f"| LDS (shared-memory load) | {LATENCY['lds']} | ~23-33: Jia et al.; Luo et al. |",
    f"| BAR.SYNC | {LATENCY['bar']} | ~20 when all warps arrive together |",
    f"| LDG, ATOM with a return value | {LATENCY['ldg']} | L2 hit ~200-300 (an L2 miss: ~{L2_MISS - 100}-"
    f"{L2_MISS + 100}); the loads and the scratch rows were just written, hence L2 hits; reloads of lines the "
    "program has just read may even hit L1 (~35), so the global waits are an upper end |",
    f"| MUFU.RCP, FCHK | {LATENCY['xu']} | ~15-25 (assumed) |",
    f"| POPC and conversions / LDC, S2R | {LATENCY['conv']} / {LATENCY['const']} | assumed |",
    f"| operands of a store read (read scoreboard) | {LATENCY['read']} | assumed |",
    "",
    'References: Z. Jia, M. Maggioni, B. Staiger, D. P. Scarpazza, "Dissecting the NVIDIA Volta GPU '
    'Architecture via Microbenchmarking", arXiv:1804.06826 (2018); Z. Jia, M. Maggioni, J. Smith, D. P. '
    'Scarpazza, "Dissecting the NVidia Turing T4 GPU via Microbenchmarking", arXiv:1903.07486 (2019); W. Luo '
    'et al., "Benchmarking and Dissecting the Nvidia Hopper GPU Architecture", arXiv:2402.13499 (2024). The '
    "values are picked inside the ranges these sources report for Volta to Hopper; none is measured here. "
    "Control-bit layout (Volta and later, second 64-bit word): stall bits 41-44, yield 45, write scoreboard "
    "46-48, read scoreboard 49-51, wait mask 52-57, as decoded by Jia et al. 2018 and the open SASS "
    "assemblers.",
    "",
    "`additive` is a second, pessimistic model: the stall cycles plus every scoreboarded instruction's full "
    "latency, one after the other, nothing overlapped. For this latency-bound single warp the truth should lie "
    "between the two. Neither models bank conflicts, instruction-cache misses, clocks below boost, programs "
    "sharing a scheduler, or DRAM bandwidth (the fused kernel's `log2phy` stores: see the note in the "
    "headline). Time: "
    f"{CLOCK_GHZ} GHz (H100 SXM boost; H200 has the same SM), {NUM_SMS} SMs, {LAUNCH_US:g} us per launch "
    "(assumed; a CUDA-graph replay costs less). These are sm_90 parts: with another `--arch` the cycles still "
    "follow from that target's SASS, the microseconds do not.",
]


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TRITON_INTERPRET"):
        print(
            "kernel_report.py: TRITON_INTERPRET is set; the kernels would be decorated for the interpreter "
            "and nothing could be compiled for a GPU target. Run it without TRITON_INTERPRET.",
            file=sys.stderr,
        )
        return 2
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--label", default="baseline", help="name of this run (a column of the comparison)")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", args.label):
        parser.error("--label: letters, digits and _.+- only")
    args.out.mkdir(parents=True, exist_ok=True)

    fns = kernel_functions()
    kernel_dir = Path(inspect.getsourcefile(fns["_rebalance_kernel"].fn)).parent
    fors, lines = source_fors(sorted(kernel_dir.glob("_*.py")))
    compiled: dict[tuple, dict] = {}
    cache: dict[tuple, Analysis] = {}
    rows = []
    for job in jobs():
        key = (job.kernel, tuple(sorted(job.constexprs.items())), job.num_warps, job.maxnreg)
        if key not in compiled:
            print(f"compiling {job.kernel} {job.shape} (num_warps={job.num_warps})", file=sys.stderr)
            compiled[key] = compile_kernel(fns[job.kernel], job.constexprs, job.num_warps, args.arch, job.maxnreg)
        analyses = []
        for assume in job.variants():
            assumed = key + (tuple(sorted(assume.items())),)
            if assumed not in cache:
                cache[assumed] = analyse(compiled[key], {**job.constexprs, **assume}, fors, lines)
            analyses.append(cache[assumed])
        rows += rows_of(args.label, job, *analyses)
    write_csv(args.out / f"kernel_report-{args.label}.csv", rows)
    labels = read_labels(args.out)
    write_csv(args.out / "kernel_report.csv", [r for name in labels for r in labels[name]])
    write_markdown(args.out / "kernel_report.md", args.label, rows, labels, provenance(args.arch))
    print(f"wrote {args.out / 'kernel_report.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
