"""Reading per-layer, per-expert load statistics from the files users have.

Formats, chosen by suffix:

* ``.json``: SGLang's expert-distribution dump, ``{"logical_count": [[count] * E] * layers}``.
  Layers whose counts are all zero are the model's dense layers: they are dropped, with a note.
* ``.pt`` / ``.pth``: a 2-D tensor saved with ``torch.save`` (or a dict holding one under
  ``"logical_count"``).
* ``.npy``: a 2-D NumPy array.
* ``.csv``: one layer per line, comma-separated counts (lines starting with ``#`` are skipped).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

SUFFIXES = (".json", ".pt", ".pth", ".npy", ".csv")


class LoadFileError(ValueError):
    """Bad or unreadable load file; the message starts with the file's path."""


@dataclass
class Loads:
    """Loads read from a file: ``weight`` is ``[L, E]`` float64; ``notes`` say what was dropped."""

    weight: torch.Tensor
    path: Path
    notes: list[str] = field(default_factory=list)


def _matrix(value: object, path: Path) -> torch.Tensor:
    try:
        t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise LoadFileError(f"{path}: loads must be a rectangular 2-D array of numbers ({exc})") from None
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise LoadFileError(f"{path}: loads must be 2-D [num_layers, num_experts] and non-empty, got {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise LoadFileError(f"{path}: loads must be real numbers, got {t.dtype}")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
        raise LoadFileError(f"{path}: loads must be finite and >= 0")
    return t


def read_loads(path: str | Path) -> Loads:
    """Read a load file (see the module doc for formats).

    Raises:
        LoadFileError: (a ``ValueError``) unknown type, missing file, malformed or invalid content.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        expected = ", ".join(SUFFIXES)
        raise LoadFileError(f"{path}: unknown load file type {suffix or '(none)'}; expected one of {expected}")
    if not path.is_file():
        raise LoadFileError(f"{path}: no such file")
    notes: list[str] = []
    try:
        if suffix == ".json":
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or "logical_count" not in data:
                raise LoadFileError(f"{path}: expected a JSON object with a 'logical_count' list (SGLang format)")
            weight = _matrix(data["logical_count"], path)
            keep = weight.sum(dim=1) > 0
            if not bool(keep.all()):
                dropped = (~keep).nonzero().view(-1).tolist()
                notes.append(f"dropped {len(dropped)} all-zero (dense) layers: rows {dropped}")
                weight = weight[keep]
                if weight.shape[0] == 0:
                    raise LoadFileError(f"{path}: every layer is all zero")
        elif suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                if "logical_count" not in obj:
                    raise LoadFileError(f"{path}: expected a tensor or a dict with 'logical_count'")
                obj = obj["logical_count"]
            weight = _matrix(obj, path)
        elif suffix == ".npy":
            weight = _matrix(np.load(path, allow_pickle=False), path)
        else:
            rows = [
                [float(x) for x in line.split(",")]
                for line in path.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")
            ]
            weight = _matrix(rows, path)
    except LoadFileError:
        raise
    except Exception as exc:  # unreadable or malformed content: one clear error naming the file
        raise LoadFileError(f"{path}: cannot read loads ({type(exc).__name__}: {exc})") from None
    return Loads(weight, path, notes)
