"""Bounds checking for Triton kernels run by the interpreter (``TRITON_INTERPRET=1``).

On a GPU an out-of-bounds read returns whatever lies there and a write corrupts another buffer,
silently; the interpreter dereferences raw host addresses, so it may return garbage, crash or
pass by luck. With the checker installed, every load, store and atomic operation of an
interpreted kernel first checks its *active* lanes (mask true): each element it touches
(``address .. address + element size``) must lie wholly inside the storage of one tensor argument
of the current launch. Anything else raises :class:`OutOfBoundsAccess` (an ``AssertionError``)
naming the kernel, the program, the operation, the address and the nearest argument. The
interpreter reports errors raised inside a kernel as ``triton.runtime.errors.InterpreterError``
with ``__cause__`` set to ours; each violation is also recorded (:func:`take_violations`), so that
the test set-up can fail a test whose code caught the error on the way.

What counts as in bounds: the whole *storage* of an argument, ``[storage data_ptr, + nbytes)``,
not the elements of the view that was passed. A kernel given a slice ``t[:, 1]`` may legitimately
read any byte of ``t`` (it is handed the strides, and nothing in the launch says which elements
it "owns"); what the checker catches is memory that belongs to no argument at all: past the end
or before the start of every buffer, another launch's tensor, a freed allocation. An access
that stays in the storage but leaves the view goes unnoticed: that is the price of no false
alarms on views.

How it hooks the interpreter (``triton/runtime/interpreter.py``, written against Triton 3.9):

* ``GridExecutor.__call__`` (one kernel launch) pushes a launch record on a thread-local stack
  and pops it at the end. ``GridExecutor._init_args_hst`` returns the host copies of the tensor
  arguments (for CPU tensors the same storages; for device tensors the interpreter's copies),
  and those are what ``_implicit_cvt`` turns into the pointers the kernel sees: the checker
  records their storages' byte ranges, labelled with the parameter names.
* ``InterpreterBuilder.create_masked_load`` / ``create_masked_store`` (which ``create_load``,
  ``create_store``, the atomic load/store/poll and the tensor-descriptor loads and stores go
  through), ``create_atomic_rmw`` and ``create_atomic_cas`` check their pointers and mask before
  calling the original.

Parameter positions are read from the originals' signatures at install time, so a Triton whose
internals moved makes :func:`install` warn once and return ``False`` instead of breaking a run.

Cost: per memory operation, one mask reduction, a min/max of the active addresses and one
bisection in the sorted ranges; the per-address search only runs when min and max do not fall in
one range (a pointer block spanning two arguments, or an error). Measured with Triton 3.9: about
10 us per operation, under 1% of the interpreter's own time on this project's kernel tests.
"""

from __future__ import annotations

import bisect
import functools
import inspect
import threading
import warnings
from dataclasses import dataclass, field

import numpy as np

__all__ = ["OutOfBoundsAccess", "install", "uninstall", "installed", "take_violations", "unavailable_reason"]


class OutOfBoundsAccess(AssertionError):
    """A kernel touched memory outside the storages of its launch's tensor arguments."""


@dataclass
class _Range:
    start: int
    end: int  # exclusive
    names: list[str]
    desc: str  # dtype and shape of the first tensor seen with this storage


@dataclass
class _Launch:
    kernel: str
    arg_names: list[str]
    ranges: list[_Range] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # sorted, for bisection
    ends: list[int] = field(default_factory=list)
    starts_np: np.ndarray | None = None

    def bind(self, args, kwargs) -> None:
        """Record the storages of the tensor arguments (tuples and tensor descriptors included)."""
        found: dict[tuple[int, int], _Range] = {}

        def visit(name: str, arg) -> None:
            if isinstance(arg, tuple):
                for i, item in enumerate(arg):
                    visit(f"{name}[{i}]", item)
            elif hasattr(arg, "untyped_storage"):  # a torch tensor
                storage = arg.untyped_storage()
                start, nbytes = int(storage.data_ptr()), int(storage.nbytes())
                if nbytes == 0:  # nothing may be touched through an empty tensor
                    return
                key = (start, start + nbytes)
                if key in found:
                    found[key].names.append(name)
                else:
                    found[key] = _Range(start, start + nbytes, [name], f"{arg.dtype} {tuple(arg.shape)}")
            elif hasattr(arg, "block_shape") and hasattr(arg, "base"):  # a TensorDescriptor
                visit(f"{name}.base", arg.base)
            elif hasattr(arg, "base") and hasattr(arg, "dtype"):  # a TensorWrapper (reinterpreted dtype)
                visit(name, arg.base)

        for i, arg in enumerate(args):
            visit(self.arg_names[i] if i < len(self.arg_names) else f"arg{i}", arg)
        for name, arg in kwargs.items():
            visit(name, arg)
        # Distinct storages do not overlap; merge any that do anyway so the bisection stays exact.
        merged: list[_Range] = []
        for r in sorted(found.values(), key=lambda r: r.start):
            if merged and r.start < merged[-1].end:
                last = merged[-1]
                last.end = max(last.end, r.end)
                last.names += r.names
            else:
                merged.append(r)
        self.ranges = merged
        self.starts = [r.start for r in merged]
        self.ends = [r.end for r in merged]
        self.starts_np = np.array(self.starts, dtype=np.uint64)


_state = threading.local()  # .stack: the launches in progress on this thread (one, normally)
_violations: list[OutOfBoundsAccess] = []
_originals: dict[tuple[type, str], object] = {}
unavailable_reason: str | None = None  # why install() could not hook the interpreter, if it could not


def take_violations() -> list[OutOfBoundsAccess]:
    """The violations raised since the last call (also those a caller caught), and forget them."""
    taken = list(_violations)
    _violations.clear()
    return taken


def installed() -> bool:
    return bool(_originals)


def _current() -> _Launch | None:
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


def _element_size(ptrs) -> int:
    """Bytes per element behind a pointer handle (int1 is stored as one byte, as create_addptr counts it)."""
    ty = ptrs.dtype
    elem = getattr(ty, "element_ty", None)
    if elem is None:  # not a pointer type: let the interpreter complain
        elem = ptrs.get_element_ty()
    bits = getattr(elem, "primitive_bitwidth", 8)
    return max(1, bits // 8)


def _check(op: str, ptrs, mask) -> None:
    """Raise OutOfBoundsAccess unless every active element of ``ptrs`` lies in one argument storage."""
    launch = _current()
    if launch is None:  # not inside a launch we saw bound (e.g. a device function called directly)
        return
    addr = np.atleast_1d(np.asarray(ptrs.data))
    active = None
    if mask is not None:
        m = np.asarray(mask.data).astype(bool, copy=False)  # int1 is np.bool_ already; never index by ints
        if m.shape != addr.shape:
            try:
                m = np.broadcast_to(m, addr.shape)
            except ValueError:  # not ours to judge: the interpreter will reject the operation
                return
        if not m.all():
            if not m.any():
                return
            active = m
    flat = addr[active] if active is not None else addr.ravel()
    if flat.size == 0:
        return
    size = _element_size(ptrs)
    lo, hi = int(flat.min()), int(flat.max()) + size
    # Fast path: the lowest and the highest element fall in one range, hence all of them do.
    i = bisect.bisect_right(launch.starts, lo) - 1
    if i >= 0 and hi <= launch.ends[i]:
        return
    # Slow path: each active element against the one range that could hold it.
    flat = flat.astype(np.uint64, copy=False)
    idx = np.searchsorted(launch.starts_np, flat, side="right").astype(np.int64) - 1
    ends = np.array(launch.ends + [0], dtype=np.uint64)  # idx -1 -> the sentinel end 0: out of bounds
    ok = (idx >= 0) & (flat + np.uint64(size) <= ends[idx])
    if ok.all():
        return
    _report(op, launch, addr, active, ok, size)


def _report(op: str, launch: _Launch, addr: np.ndarray, active, ok: np.ndarray, size: int) -> None:
    # Lanes (block coordinates) of the bad elements, in the pointer block's own shape.
    lanes = np.argwhere(active) if active is not None else np.argwhere(np.ones(addr.shape, dtype=bool))
    bad_lanes = lanes[~ok]
    bad_addr = int(addr[tuple(bad_lanes[0])])
    where = _describe(launch, bad_addr, size)
    grid = getattr(_interpreter_builder(), "grid_idx", None)
    msg = (
        f"out-of-bounds {op} in kernel {launch.kernel}, program {grid}: {size}-byte element at "
        f"0x{bad_addr:x} (lane {tuple(int(x) for x in bad_lanes[0])} of a {tuple(addr.shape)} block), {where}; "
        f"{len(bad_lanes)} of {len(lanes)} active lanes out of bounds"
    )
    exc = OutOfBoundsAccess(msg)
    _violations.append(exc)
    raise exc


def _describe(launch: _Launch, address: int, size: int) -> str:
    """Where ``address`` lies relative to the nearest argument storage."""
    if not launch.ranges:
        return "and the launch has no tensor argument with storage"
    best, best_dist, side = None, None, ""
    for r in launch.ranges:
        if address < r.start:
            dist, where = r.start - address, "starts {} bytes before the start"
        else:  # reaches past the end (by part of an element when it straddles the end)
            dist, where = max(0, address + size - r.end), "reaches {} bytes past the end"
        if best_dist is None or dist < best_dist:
            best, best_dist, side = r, dist, where
    names = "/".join(repr(n) for n in best.names)
    # The offset from every argument, in elements where it is a whole number of them: a wild
    # address rarely lies near the buffer it was computed from, but its offset gives it away
    # (an index of 2**30 or an int32 overflow to -2**31 elements, say).
    offsets = []
    for r in launch.ranges:
        off = address - r.start
        offsets.append("/".join(r.names) + (f" {off // size:+d}" if off % size == 0 else f" {off:+d} bytes"))
    return (
        f"{side.format(best_dist)} of argument {names} ({best.desc}, storage of {best.end - best.start} bytes "
        f"at 0x{best.start:x}; byte offset {address - best.start:+d}); offset in {size}-byte elements from the "
        f"start of each argument: {', '.join(offsets)}"
    )


# ---------------------------------------------------------------------------------------------
# Installing the hooks
# ---------------------------------------------------------------------------------------------

_interp = None  # the triton.runtime.interpreter module, once imported


def _interpreter_builder():
    return getattr(_interp, "interpreter_builder", None)


def _param_index(fn, name: str) -> int:
    """Position of parameter ``name`` among the arguments after ``self``; KeyError if absent."""
    params = list(inspect.signature(fn).parameters)
    if name not in params:
        raise KeyError(f"{fn.__qualname__} has no parameter {name!r} (parameters: {params})")
    return params.index(name) - 1


def _getter(fn, name: str | None):
    """A function returning argument ``name`` from ``(args, kwargs)`` of a call to ``fn`` (None for no name)."""
    if name is None:
        return lambda args, kwargs: None
    i = _param_index(fn, name)
    return lambda args, kwargs: args[i] if i < len(args) else kwargs.get(name)


def _wrap_memory_op(original, op, ptr_name: str, mask_name: str | None, op_of=None):
    get_ptr, get_mask = _getter(original, ptr_name), _getter(original, mask_name)
    get_rmw = _getter(original, "rmwOp") if op_of else None

    @functools.wraps(original)
    def checked(self, *args, **kwargs):
        name = op_of(get_rmw(args, kwargs)) if op_of else op
        _check(name, get_ptr(args, kwargs), get_mask(args, kwargs))
        return original(self, *args, **kwargs)

    return checked


def _rmw_name(rmw) -> str:
    """``atomic_add`` etc. from an ``ir.ATOMIC_OP`` value (``FADD`` is a float ``atomic_add``)."""
    name = getattr(rmw, "name", None) or str(rmw).rsplit(".", 1)[-1]
    name = name.lower()
    return "atomic_" + {"fadd": "add", "umin": "min", "umax": "max"}.get(name, name)


def _wrap_call(original):
    @functools.wraps(original)
    def launch(self, *args, **kwargs):
        stack = getattr(_state, "stack", None)
        if stack is None:
            stack = _state.stack = []
        stack.append(_Launch(getattr(self.fn, "__name__", "?"), list(getattr(self, "arg_names", []))))
        try:
            return original(self, *args, **kwargs)
        finally:
            stack.pop()

    return launch


def _wrap_init_args(original):
    @functools.wraps(original)
    def init_args(self, *args, **kwargs):
        args_hst, kwargs_hst = result = original(self, *args, **kwargs)
        launch = _current()
        if launch is not None:
            launch.bind(args_hst, kwargs_hst)
        return result

    return init_args


def install() -> bool:
    """Hook the interpreter; True when the checker is (now) active. Idempotent.

    When the interpreter lacks what the checker needs (another Triton version), warns once,
    sets :data:`unavailable_reason` and returns False without changing anything."""
    global _interp, unavailable_reason
    if _originals:
        return True
    if unavailable_reason is not None:
        return False
    try:
        from triton.runtime import interpreter

        builder, executor = interpreter.InterpreterBuilder, interpreter.GridExecutor
        wrapped = {
            (executor, "__call__"): _wrap_call(executor.__call__),
            (executor, "_init_args_hst"): _wrap_init_args(executor._init_args_hst),
            (builder, "create_masked_load"): _wrap_memory_op(builder.create_masked_load, "load", "ptrs", "mask"),
            (builder, "create_masked_store"): _wrap_memory_op(builder.create_masked_store, "store", "ptrs", "mask"),
            (builder, "create_atomic_rmw"): _wrap_memory_op(builder.create_atomic_rmw, None, "ptr", "mask", _rmw_name),
            (builder, "create_atomic_cas"): _wrap_memory_op(builder.create_atomic_cas, "atomic_cas", "ptr", None),
        }
    except Exception as exc:  # ImportError, AttributeError, KeyError: internals differ
        import triton

        unavailable_reason = f"interpreter bounds check unavailable with triton {triton.__version__}: {exc}"
        warnings.warn(unavailable_reason, RuntimeWarning, stacklevel=2)
        return False
    _interp = interpreter
    for (owner, name), new in wrapped.items():
        _originals[(owner, name)] = owner.__dict__[name]
        setattr(owner, name, new)
    return True


def uninstall() -> None:
    """Restore the interpreter's own methods."""
    while _originals:
        (owner, name), original = _originals.popitem()
        setattr(owner, name, original)
