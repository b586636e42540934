"""Reading per-layer, per-expert load statistics from the files users have.

Formats, chosen by suffix:

* ``.json``: SGLang's expert-distribution dump, ``{"logical_count": [[count] * E] * layers}``.
* ``.pt`` / ``.pth``: a 2-D dense tensor saved with ``torch.save``, or a dict holding one under
  ``"logical_count"`` (SGLang's recorder dump).

SGLang's ``logical_count`` may also be ``[steps, layers, E]`` (its recorder's per-step buffer):
the steps are summed, as SGLang's planner does, with a note.
* ``.npy``: a 2-D NumPy array of integers or floats.
* ``.csv``: one layer per line, comma-separated decimal numbers (lines starting with ``#`` are skipped).

Counts are real numbers only: JSON strings, booleans and nulls, NumPy booleans, complex numbers,
strings, dates and objects, and CSV fields such as ``1_000``, ``nan`` or ``0x10`` are refused.
Text files are UTF-8, with or without a byte-order mark. In every format, layers whose counts are
all zero are the model's dense layers: they are dropped, with a note, and :attr:`Loads.layers`
keeps each remaining row's index in the file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

SUFFIXES = (".json", ".pt", ".pth", ".npy", ".csv")

# A decimal number as people write it: optional sign, digits with an optional fraction, optional exponent.
# Deliberately narrower than float(): no "1_000", "nan", "inf", hex, or non-ASCII digits.
_CSV_NUMBER = re.compile(r"\s*[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*", re.ASCII)


class LoadFileError(ValueError):
    """Bad or unreadable load file; the message starts with the file's path and is one line."""


@dataclass
class Loads:
    """Loads read from a file: ``weight`` is ``[L, E]`` float64 without all-zero layers, ``layers[i]``
    the model layer index of row ``i`` (its row in the file), ``notes`` what was dropped or summed."""

    weight: torch.Tensor
    path: Path
    notes: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal colours in library messages


def _printable(text: str) -> str:
    """``text`` with control characters (a newline in a file name) written as escapes."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr, with exit code 2 (the command line and the benchmark)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def one_line(text: object, limit: int | None = 200) -> str:
    """``text`` as one printable line for an error message: whitespace runs collapsed, terminal colours
    dropped, other control characters escaped, at most ``limit`` characters."""
    flat = _printable(" ".join(_ANSI_ESCAPE.sub("", str(text)).split()))
    return flat if limit is None or len(flat) <= limit else flat[: limit - 3] + "..."


def _error(path: Path, message: str) -> LoadFileError:
    return LoadFileError(f"{_printable(str(path))}: {message}")


def _check_numbers(value: object, path: Path, name: str) -> None:
    """Every leaf of nested lists ``value`` is an int or a float; ``bool`` (an int in Python) is not."""
    stack: list[tuple[tuple[int, ...], object]] = [((), value)]
    while stack:
        index, v = stack.pop()
        if isinstance(v, list):
            stack.extend(((*index, i), x) for i, x in reversed(list(enumerate(v))))  # first bad leaf first
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            where = name + "".join(f"[{i}]" for i in index)
            raise _error(path, f"{where} must be a number, got {type(v).__name__} {one_line(repr(v), 40)}")


def _matrix(value: object, path: Path, steps: list[str] | None = None) -> torch.Tensor:
    """The loads as a float64 ``[layers, experts]`` tensor. ``steps``: SGLang's ``logical_count`` may
    be ``[steps, layers, experts]`` (its recorder's per-step buffer); it is summed over the steps,
    as SGLang's own planner does, and a note is appended to ``steps``."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_quantized:
            kind = "quantized" if value.is_quantized else str(value.layout).removeprefix("torch.")
            fix = "t.dequantize()" if value.is_quantized else "t.to_dense()"
            raise _error(path, f"loads must be a dense tensor, got a {kind} tensor (save {fix} instead)")
        if value.dtype == torch.bool or value.is_complex():
            raise _error(path, f"loads must be real numbers (integer or floating point), got {value.dtype}")
        t = value
    else:
        if isinstance(value, np.ndarray) and value.dtype.kind not in "iuf":
            raise _error(path, f"loads must be real numbers (integer or floating point), got dtype {value.dtype}")
        try:
            t = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except OverflowError:  # a JSON integer beyond float64
            raise _error(path, "loads must be finite and >= 0, found a number too large for a float") from None
        except (TypeError, ValueError) as exc:
            raise _error(path, f"loads must be a rectangular 2-D array of numbers ({one_line(exc)})") from None
    stacked = steps is not None and t.dim() == 3 and t.shape[0] > 0
    if (t.dim() != 2 and not stacked) or 0 in t.shape[-2:]:
        steps_too = " (or 3-D [steps, num_layers, num_experts])" if steps is not None else ""
        raise _error(
            path, f"loads must be 2-D [num_layers, num_experts]{steps_too} and non-empty, got {tuple(t.shape)}"
        )
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise _error(path, "loads must be finite and >= 0")
    if stacked:
        steps.append(f"logical_count holds {t.shape[0]} recorded steps; their counts are summed, as SGLang does")
        t = t.sum(dim=0)
    return t


def _csv_rows(text: str, path: Path) -> list[list[float]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(",")
        for column, x in enumerate(fields, start=1):
            if not _CSV_NUMBER.fullmatch(x):
                raise _error(path, f"line {number}, field {column}: not a decimal number: {one_line(repr(x), 40)}")
        rows.append([float(x) for x in fields])
    return rows


def read_loads(path: str | Path) -> Loads:
    """Read a load file (see the module doc for formats).

    Raises:
        LoadFileError: (a ``ValueError``) unknown type, missing or unreadable file, malformed or invalid
            content; the message is one line and starts with the path.
    """
    path = Path(path)
    if path.is_dir():
        raise _error(path, "is a directory, not a load file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        expected = ", ".join(SUFFIXES)
        raise _error(path, f"unknown load file type {_printable(suffix) or '(none)'}; expected one of {expected}")
    if not path.exists():
        raise _error(path, "no such file")
    if not path.is_file():
        raise _error(path, "not a regular file")
    notes: list[str] = []
    try:
        if suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            if not isinstance(data, dict) or "logical_count" not in data:
                raise _error(path, "expected a JSON object with a 'logical_count' list (SGLang format)")
            _check_numbers(data["logical_count"], path, "logical_count")
            weight = _matrix(data["logical_count"], path, notes)
        elif suffix in (".pt", ".pth"):
            with warnings.catch_warnings():  # deprecation notes about old storage formats: not the user's to act on
                warnings.simplefilter("ignore")
                obj = torch.load(path, map_location="cpu", weights_only=True)
            stacked = None
            if isinstance(obj, dict):
                if "logical_count" not in obj:
                    raise _error(path, "expected a tensor or a dict with 'logical_count'")
                obj, stacked = obj["logical_count"], notes  # SGLang's recorder dump: maybe per step
            if not isinstance(obj, torch.Tensor):
                _check_numbers(obj, path, "loads")
            weight = _matrix(obj, path, stacked)
        elif suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            if not isinstance(array, np.ndarray):  # an .npz archive renamed .npy
                raise _error(path, f"expected one NumPy array, got {type(array).__name__}")
            weight = _matrix(array, path)
        else:
            weight = _matrix(_csv_rows(path.read_text(encoding="utf-8-sig"), path), path)
    except LoadFileError:
        raise
    except OSError as exc:
        raise _error(path, f"cannot read ({one_line(exc.strerror or exc)})") from None
    except Exception as exc:  # malformed content: one clear error naming the file
        raise _error(path, f"cannot read loads ({type(exc).__name__}: {one_line(exc)})") from None
    # All-zero layers are the model's dense layers (DeepSeek-V3's first three), in every format.
    keep = weight.sum(dim=1) > 0
    if not bool(keep.any()):
        raise _error(path, "every layer is all zero")
    layers = keep.nonzero().view(-1).tolist()
    if len(layers) < weight.shape[0]:
        dropped = (~keep).nonzero().view(-1).tolist()
        notes.append(f"dropped {len(dropped)} all-zero (dense) layers: rows {dropped}")
        weight = weight[keep]
    return Loads(weight, path, notes, layers)
