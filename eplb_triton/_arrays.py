"""numpy arrays and nested lists where the public functions take tensors.

:func:`accepts_arrays` wraps a public function so that the named tensor arguments may also be
numpy arrays of real numbers or nested lists of numbers. Tensors pass through untouched; when
the first of them (the loads, for the planning functions) came as a numpy array, the function's
tensor outputs come back as numpy arrays (the same dtypes), otherwise as tensors: a numpy
``old_phy2log`` next to a CUDA ``weight`` still gives CUDA outputs.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable

import numpy as np
import torch


def as_tensor(value: object, name: str) -> tuple[object, bool]:
    """``(tensor, numpy_in)``: a numpy array or a nested list of real numbers as a CPU tensor.

    The tensor shares the array's memory where it can; nothing writes to it. Anything else is
    returned as it is, for the function's own checks to name.
    """
    if value is None or isinstance(value, torch.Tensor):  # None: an optional argument left out
        return value, False
    numpy_in = isinstance(value, np.ndarray)
    if not (numpy_in or isinstance(value, (list, tuple))):
        raise TypeError(f"{name} must be a torch.Tensor, a numpy.ndarray or a nested list, got {type(value).__name__}")
    try:
        array = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise TypeError(f"{name} must be a rectangular nested list of numbers ({exc})") from None
    if array.dtype.kind not in "iuf":
        raise TypeError(f"{name} must have a real dtype (integer or floating point), got numpy {array.dtype}")
    if array.dtype.kind == "u" and array.dtype.itemsize > 1:  # torch has few unsigned kernels
        array = array.astype(np.float64 if array.dtype.itemsize == 8 else np.int64)
    if array.dtype.kind == "f" and array.dtype.itemsize > 8:  # long double: no torch dtype
        array = array.astype(np.float64)
    if not array.dtype.isnative:  # big-endian data: torch takes native byte order only
        array = array.astype(array.dtype.newbyteorder("="))
    with warnings.catch_warnings():  # a read-only array: nothing here writes to it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array)), numpy_in


def _to_numpy(out: object) -> object:
    if isinstance(out, torch.Tensor):
        return out.cpu().numpy()
    if isinstance(out, tuple):
        return tuple(_to_numpy(o) for o in out)
    return out


def accepts_arrays(*names: str) -> Callable[[Callable], Callable]:
    """Let the arguments ``names`` of the decorated function be numpy arrays or nested lists."""

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)
        empty = inspect.Parameter.empty
        shown = signature.replace(  # the call's shape without type hints, for error messages
            parameters=[p.replace(annotation=empty) for p in signature.parameters.values()], return_annotation=empty
        )

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as exc:  # name the function: the wrapper hides it from Python's message
                raise TypeError(f"{fn.__name__}{shown}: {exc}") from None
            numpy_in = False
            for name in names:
                if name in bound.arguments:
                    bound.arguments[name], was_numpy = as_tensor(bound.arguments[name], name)
                    if name == names[0]:  # the loads decide numpy outputs
                        numpy_in = was_numpy
            out = fn(*bound.args, **bound.kwargs)
            return _to_numpy(out) if numpy_in else out

        return wrapper

    return decorate
