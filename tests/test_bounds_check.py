"""The interpreter's bounds check (``_bounds.py``) catches what it must and nothing else.

Each out-of-bounds case runs a tiny kernel whose access lands just outside a buffer; the checker
raises before the interpreter dereferences the address, so these runs never touch foreign memory.
"""

from __future__ import annotations

import os

import _bounds
import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from _bounds import OutOfBoundsAccess

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the Triton interpreter")

BLOCK = 16


@pytest.fixture(autouse=True)
def checker():
    """The checker on for these tests, also under EPLB_BOUNDS_CHECK=0 (then only for them)."""
    was_on = _bounds.installed()
    if not _bounds.install():
        pytest.skip(_bounds.unavailable_reason)
    _bounds.take_violations()
    yield
    if not was_on:
        _bounds.uninstall()


def raises_oob(run, *expected: str) -> OutOfBoundsAccess:
    """``run()`` fails with an OutOfBoundsAccess (possibly wrapped by the interpreter) whose message
    contains each of ``expected``; the violation is recorded once and consumed here."""
    with pytest.raises(Exception) as info:
        run()
    exc: BaseException | None = info.value
    while exc is not None and not isinstance(exc, OutOfBoundsAccess):
        exc = exc.__cause__
    assert exc is not None, f"expected an out-of-bounds access, got {info.value!r}"
    assert _bounds.take_violations() == [exc]
    for text in expected:
        assert text in str(exc), str(exc)
    assert _bounds._current() is None  # the failed launch was popped
    return exc


@triton.jit
def _read_kernel(src, out, n, extra, BLOCK: tl.constexpr):
    """out[:n] = src[:n]; lanes n .. n + extra also read src (past its end when extra > 0)."""
    offs = tl.arange(0, BLOCK)
    v = tl.load(src + offs, mask=offs < n + extra, other=0.0)
    tl.store(out + offs, v, mask=offs < n)


@triton.jit
def _write_kernel(dst, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(dst + offs, offs.to(tl.float32), mask=offs < n)


@triton.jit
def _atomic_kernel(dst, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.atomic_add(dst + offs, 1, mask=offs < n)


@triton.jit
def _cas_kernel(dst, i):
    tl.atomic_cas(dst + i, 0, 7)


@triton.jit
def _peek_kernel(src, out, i):
    """out[0] = src[i], unmasked (the interpreter's plain load and store)."""
    tl.store(out, tl.load(src + i))


@triton.jit
def _strided_read_kernel(src, out, n, stride, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out + offs, tl.load(src + offs * stride, mask=offs < n), mask=offs < n)


def test_in_bounds_accesses_pass_and_compute():
    src, out = torch.arange(8, dtype=torch.float32), torch.zeros(8)
    _read_kernel[(1,)](src, out, 8, 0, BLOCK=BLOCK)  # lanes 8..15 point past src but are masked off
    assert torch.equal(out, src)
    dst = torch.zeros(8, dtype=torch.int32)
    _atomic_kernel[(1,)](dst, 8, BLOCK=BLOCK)
    assert dst.tolist() == [1] * 8
    assert _bounds.take_violations() == []


def test_load_one_past_the_end_raises():
    src, out = torch.arange(8, dtype=torch.float32), torch.zeros(8)
    exc = raises_oob(
        lambda: _read_kernel[(1,)](src, out, 8, 1, BLOCK=BLOCK),
        "out-of-bounds load in kernel _read_kernel",
        "program (0, 0, 0)",
        f"at 0x{src.data_ptr() + 32:x}",
        "lane (8,)",
        "reaches 4 bytes past the end of argument 'src'",
        "byte offset +32",
        "1 of 9 active lanes",
    )
    assert "torch.float32 (8,)" in str(exc)


def test_masked_off_lanes_are_not_checked():
    """Lanes 8..15 point past src and out (and far beyond with n = 0), but their mask is false."""
    src, out = torch.arange(8, dtype=torch.float32), torch.zeros(8)
    _read_kernel[(1,)](src, out, 0, 0, BLOCK=BLOCK)
    _write_kernel[(1,)](out, 0, BLOCK=BLOCK)
    assert _bounds.take_violations() == []


def test_store_past_the_end_raises():
    dst = torch.zeros(8)
    raises_oob(
        lambda: _write_kernel[(1,)](dst, 10, BLOCK=BLOCK),
        "out-of-bounds store in kernel _write_kernel",
        "lane (8,)",
        "reaches 4 bytes past the end of argument 'dst'",
        "2 of 10 active lanes",
    )
    assert dst.tolist() == [0.0] * 8  # raised before anything was written


def test_atomic_add_past_the_end_raises():
    dst = torch.zeros(8, dtype=torch.int32)
    raises_oob(
        lambda: _atomic_kernel[(1,)](dst, 9, BLOCK=BLOCK),
        "out-of-bounds atomic_add in kernel _atomic_kernel",
        "argument 'dst'",
    )


def test_atomic_cas_and_unmasked_load_before_the_start_raise():
    dst = torch.zeros(4, dtype=torch.int64)
    raises_oob(lambda: _cas_kernel[(1,)](dst, -1), "out-of-bounds atomic_cas", "starts 8 bytes before the start")
    out = torch.zeros(1, dtype=torch.int64)
    raises_oob(lambda: _peek_kernel[(1,)](dst, out, 4), "out-of-bounds load in kernel _peek_kernel", "argument 'src'")
    _peek_kernel[(1,)](dst, out, 3)  # the last element: in bounds


def test_a_strided_view_is_checked_against_its_storage():
    """``t[:, 1]`` read through its strides: in bounds, also beyond the view's own 6 elements (the
    storage is the range, see the module docstring); past the storage it raises."""
    t = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    view = t[:, 1]
    assert not view.is_contiguous()
    out = torch.zeros(BLOCK)
    _strided_read_kernel[(1,)](view, out, 6, view.stride(0), BLOCK=BLOCK)
    assert torch.equal(out[:6], view)
    # Columns 1..3 of the rows, an element outside the view but inside t: not flagged.
    _strided_read_kernel[(1,)](view, out, 16, 1, BLOCK=BLOCK)
    assert torch.equal(out, t.flatten()[1:17])
    assert _bounds.take_violations() == []
    # Row 6 of column 1 lies 4 bytes past t's storage (24 floats): caught, named after the view.
    raises_oob(
        lambda: _strided_read_kernel[(1,)](view, out, 7, view.stride(0), BLOCK=BLOCK),
        "lane (6,)",
        "reaches 8 bytes past the end of argument 'src' (torch.float32 (6,), storage of 96 bytes",
    )


def test_another_launchs_tensor_is_out_of_bounds():
    """A live tensor that this launch was not given: valid memory, but no argument's."""
    other = torch.full((8,), 5.0)
    _write_kernel[(1,)](other, 8, BLOCK=BLOCK)  # a launch of its own
    src, out = torch.zeros(8), torch.zeros(1)
    delta = other.data_ptr() - src.data_ptr()
    assert delta % 4 == 0
    raises_oob(lambda: _peek_kernel[(1,)](src, out, delta // 4), "out-of-bounds load in kernel _peek_kernel")
    _peek_kernel[(1,)](other, out, 2)  # given as an argument, the same address is fine
    assert out.item() == 2.0


def test_arguments_sharing_a_storage_are_named_together():
    t = torch.zeros(8)
    raises_oob(lambda: _read_kernel[(1,)](t[:4], t[4:], 4, 5, BLOCK=BLOCK), "argument 'src'/'out'")


def test_a_caught_violation_is_still_recorded():
    """The conftest fixture fails a test with a violation its code swallowed: it is in the record."""
    dst = torch.zeros(8)
    try:
        _write_kernel[(1,)](dst, 9, BLOCK=BLOCK)
    except Exception:
        pass
    (found,) = _bounds.take_violations()
    assert "out-of-bounds store in kernel _write_kernel" in str(found)


@triton.jit
def _descriptor_kernel(desc, out, row):
    """Rows row .. row + 3 of an [8, 8] float32 tensor through a descriptor; rows past 8 pad with 0."""
    block = desc.load([row, 0])
    offs = tl.arange(0, 4)[:, None] * 8 + tl.arange(0, 8)[None, :]
    tl.store(out + offs, block)


def test_tensor_descriptor_padding_is_not_out_of_bounds():
    from triton.tools.tensor_descriptor import TensorDescriptor

    t = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    out = torch.full((4, 8), -1.0)
    _descriptor_kernel[(1,)](TensorDescriptor.from_tensor(t, [4, 8]), out, 6)
    assert torch.equal(out[:2], t[6:]) and torch.equal(out[2:], torch.zeros(2, 8))
    assert _bounds.take_violations() == []


def test_other_interpreter_internals_warn_instead_of_breaking(monkeypatch):
    """A Triton whose builder methods take other parameters: install() warns, hooks nothing, returns False."""
    from triton.runtime import interpreter

    _bounds.uninstall()
    try:
        monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", lambda self, pointers, m: None)
        monkeypatch.setattr(_bounds, "unavailable_reason", None)
        with pytest.warns(RuntimeWarning, match="bounds check unavailable with triton .*'ptrs'"):
            assert not _bounds.install()
        assert not _bounds.installed()
        assert not _bounds.install()  # once: no second warning, the reason is kept
        monkeypatch.undo()
    finally:
        assert _bounds.install()


def test_off_switch_and_reinstall():
    """uninstall() restores the interpreter's methods; install() hooks them again."""
    from triton.runtime import interpreter

    hooked = interpreter.InterpreterBuilder.create_masked_load
    _bounds.uninstall()
    try:
        assert not _bounds.installed()
        assert interpreter.InterpreterBuilder.create_masked_load is not hooked
        src, out = torch.zeros(8), torch.zeros(8)
        _read_kernel[(1,)](src, out, 8, 0, BLOCK=BLOCK)
    finally:
        assert _bounds.install()
    assert _bounds.installed() and _bounds._current() is None
    assert np.array_equal(out.numpy(), src.numpy())
