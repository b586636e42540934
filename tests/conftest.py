"""Test set-up. Without a GPU the Triton kernels run on the interpreter: TRITON_INTERPRET must be
set before ``triton.jit`` decorates them, i.e. before anything imports ``eplb_triton.kernels``.

Under the interpreter every load, store and atomic of a kernel is bounds-checked (``_bounds.py``):
an access outside the storages of the launch's tensor arguments fails the test, even when the code
under test caught the error. ``EPLB_BOUNDS_CHECK=0`` turns the check off."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("EPLB_BOUNDS_CHECK", "1") != "0":
    import _bounds

    if _bounds.install():

        @pytest.fixture(autouse=True)
        def _no_out_of_bounds_access():
            """Fails a test if a kernel went out of bounds, also when the exception was caught on the way."""
            _bounds.take_violations()
            yield
            if found := _bounds.take_violations():
                pytest.fail(f"{len(found)} out-of-bounds access(es) in kernels, first: {found[0]}", pytrace=False)
