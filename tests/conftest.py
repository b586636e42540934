"""Test set-up. Without a GPU the Triton kernels run on the interpreter: TRITON_INTERPRET must be
set before ``triton.jit`` decorates them, i.e. before anything imports ``eplb_triton.kernels``.

Under the interpreter every load, store and atomic of a kernel is bounds-checked (``_bounds.py``):
an access outside the storages of the launch's tensor arguments fails the test, even when the code
under test caught the error. ``EPLB_BOUNDS_CHECK=0`` turns the check off."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch


def _drop_checkout_root() -> None:
    """``python -m pytest`` puts the working directory first on ``sys.path``. From the repository
    root, its top-level ``kernels/`` folder (installed as ``eplb_triton.kernels``) then shadows
    Hugging Face's ``kernels`` package, which transformers, and so vLLM, imports: the adapter tests
    against a real vLLM failed with "cannot import name 'CUDAProperties' from 'kernels'". Where the
    package is installed the root is not needed on the path, so it goes."""
    root = str(Path(__file__).resolve().parents[1])
    kept = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    if len(kept) < len(sys.path):
        saved, sys.path[:] = sys.path[:], kept
        importlib.invalidate_caches()
        if importlib.util.find_spec("eplb_triton") is None:  # not installed: the checkout is the package
            sys.path[:] = saved


_drop_checkout_root()

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
