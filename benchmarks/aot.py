"""Ahead-of-time compilation of the kernels for real GPU targets, on a machine without a GPU.

The one harness of the compile tests (``tests/test_compile_targets.py``) and the static kernel
report (``benchmarks/kernel_report.py``): a kernel is compiled with ``triton.compile`` for
``GPUTarget("cuda", arch, 32)`` from the constexprs and warps its runtime launch uses
(``eplb_triton.launch.*_launch``), its pointers marked 16-byte aligned as Triton's JIT specialises
torch's allocations, and the cubin is read with the ``cuobjdump``/``nvdisasm`` Triton ships.

Triton must not be in interpreter mode here (``TRITON_INTERPRET`` set before the kernels are
imported decorates them for the CPU): :func:`compile_in_subprocess` runs the compilation in a
clean process for callers that have it set (the test suite).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent

POINTERS = {  # the type of each non-constexpr kernel argument, by name
    "w_ptr": "*fp32", "phy2log_ptr": "*i64", "phyrank_ptr": "*i64", "logcnt_ptr": "*i64", "log2phy_ptr": "*i64",
    "invalid_ptr": "*i32", "scratch_i_ptr": "*i32", "scratch_f_ptr": "*fp32", "pack_ptr": "*i64", "rank_ptr": "*i64",
    "cnt_ptr": "*i64", "ids_ptr": "*i64", "counts_ptr": "*i64", "n_invalid_ptr": "*i64", "phy_ptr": "*i64",
    "n_entries": "i32", "stride_l2p_e": "i32", "stride_l2p_x": "i32", "stride_cnt": "i32", "stride_counts": "i32",
    "phy_in_ptr": "*i64", "rank_in_ptr": "*i64", "cnt_in_ptr": "*i64", "old_ptr": "*i64", "budget": "i32",
    "skip_ptr": "*i32", "share_ptr": "*fp64", "enode_ptr": "*i32", "overlap_ptr": "*i64", "col_ptr": "*i64",
    "max_rounds": "i32", "quota_ptr": "*i64", "rounds_ptr": "*i64", "scr_ptr": "*i32", "target_ptr": "*i64",
    "changed_ptr": "*i32",
}  # fmt: skip

# kernel name -> "module.function" under eplb_triton.kernels
KERNELS = {
    "rebalance": "_rebalance._rebalance_kernel",
    "replicate": "_rebalance._replicate_kernel",
    "packing": "_rebalance._balanced_packing_kernel",
    "dispatch": "_dispatch._record_dispatch_kernel",
    "search": "_search._search_kernel",
    "assign": "_assign._assign_kernel",
    "split": "_split._balanced_split_kernel",
    "pairs": "_pairs._pairs_kernel",
    "repair": "_repair._repair_kernel",
}


def tools() -> Path:
    """The folder of the ptxas, cuobjdump and nvdisasm that Triton ships."""
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def kernel(name: str):
    """The ``@triton.jit`` function of a :data:`KERNELS` name."""
    import importlib

    module, attr = KERNELS[name].split(".")
    return getattr(importlib.import_module(f"eplb_triton.kernels.{module}"), attr)


def signature(fn) -> dict[str, str]:
    return {p.name: ("constexpr" if p.is_constexpr else POINTERS[p.name]) for p in fn.params}


def aligned_pointers(sig: dict[str, str]) -> dict:
    """``attrs`` marking every pointer argument 16-byte aligned (``tt.divisibility``), as the JIT
    specialises torch's allocations at launch: the AOT build then vectorises what the runtime does."""
    return {(k,): [["tt.divisibility", 16]] for k, ty in enumerate(sig.values()) if ty.startswith("*")}


def compile_kernel(
    fn, constexprs: dict, num_warps: int, arch: int, maxnreg: int | None = None, sass: bool = False
) -> dict:
    """Compile ``fn`` for ``sm_{arch}``: ``{"ptx", "usage", "shared", "local_ops"}`` (``local_ops``:
    the local-memory loads and stores in the SASS, i.e. spill traffic) and, with ``sass``, the SASS
    (``"sass"``) and the SASS with source lines (``"lined"``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = signature(fn)
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs), attrs=aligned_pointers(sig))
    options = {"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRITON_DEFAULT_FP_FUSION notice; the default is what runs
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    out = {"ptx": compiled.asm["ptx"], "shared": int(getattr(compiled.metadata, "shared", 0))}
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])

        def tool(*args: str) -> str:
            cmd = [str(tools() / args[0]), *args[1:], str(cubin)]
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

        out["usage"] = tool("cuobjdump", "--dump-resource-usage")
        machine = tool("cuobjdump", "-sass")
        out["local_ops"] = len(re.findall(r"\b(?:STL|LDL)\b", machine))  # spill stores and reloads
        if sass:
            out["sass"] = machine
            out["lined"] = tool("nvdisasm", "-c", "-gi")
    return out


def resources(usage: str) -> dict[str, int]:
    """``REG``, ``STACK``, ``SHARED``, ``LOCAL`` of a ``cuobjdump --dump-resource-usage`` listing."""
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}


def _compile_job(job: tuple) -> dict:
    """One job ``(kernel name, constexprs, num_warps, arch[, maxnreg])``; an error is returned, not raised."""
    name, constexprs, num_warps, arch, *maxnreg = job
    try:
        return compile_kernel(kernel(name), constexprs, num_warps, arch, maxnreg[0] if maxnreg else None)
    except Exception as exc:  # reported by the test of this job
        return {"error": f"{type(exc).__name__}: {exc}"}


def _worker(jobs_file: str, out: str) -> None:
    from concurrent.futures import ProcessPoolExecutor

    jobs = json.loads(Path(jobs_file).read_text())
    with ProcessPoolExecutor(max_workers=2) as pool:
        results = dict(zip(jobs, pool.map(_compile_job, [tuple(j) for j in jobs.values()]), strict=True))
    Path(out).write_text(json.dumps(results))


def compile_in_subprocess(jobs: dict[str, tuple], folder: Path) -> dict[str, dict]:
    """Compile ``{id: (kernel name, constexprs, num_warps, arch[, maxnreg])}`` in a process without
    ``TRITON_INTERPRET`` (two compilations at a time); ``{id: result or {"error": ...}}``."""
    jobs_file, out = folder / "jobs.json", folder / "compiled.json"
    jobs_file.write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import aot; aot._worker({str(jobs_file)!r}, {str(out)!r})"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=HERE)
    return json.loads(out.read_text())
