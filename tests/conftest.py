"""Test set-up. Without a GPU the Triton kernels run on the interpreter: TRITON_INTERPRET must be
set before ``triton.jit`` decorates them, i.e. before anything imports ``eplb_triton.kernels``."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
