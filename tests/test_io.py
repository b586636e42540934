"""Load-file reader: every format, and clear errors for anything else."""

import json

import numpy as np
import pytest
import torch

from eplb_triton.io import LoadFileError, read_loads

ROWS = [[0, 0, 0, 0], [5, 1, 0, 2], [0, 0, 0, 0], [3, 3, 3, 4]]


def test_sglang_json_drops_dense_layers(tmp_path):
    path = tmp_path / "loads.json"
    path.write_text(json.dumps({"logical_count": ROWS}))
    loads = read_loads(path)
    assert loads.weight.tolist() == [[5, 1, 0, 2], [3, 3, 3, 4]]
    assert loads.weight.dtype == torch.float64
    assert loads.notes == ["dropped 2 all-zero (dense) layers: rows [0, 2]"]


def test_tensor_numpy_and_csv_formats(tmp_path):
    want = torch.tensor(ROWS[1:2] + ROWS[3:], dtype=torch.float64)
    torch.save(want.to(torch.int32), tmp_path / "a.pt")
    torch.save({"logical_count": want}, tmp_path / "b.pth")
    np.save(tmp_path / "c.npy", want.numpy())
    (tmp_path / "d.csv").write_text("# layer loads\n5,1,0,2\n\n3, 3, 3, 4\n")
    for name in ("a.pt", "b.pth", "c.npy", "d.csv"):
        loads = read_loads(tmp_path / name)
        assert torch.equal(loads.weight, want), name
        assert loads.notes == []


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("x.txt", "1,2", r"unknown load file type \.txt; expected one of \.json, \.pt"),
        ("x.json", "{not json", r"cannot read loads \(JSONDecodeError"),
        ("x.json", json.dumps({"counts": [[1]]}), r"expected a JSON object with a 'logical_count' list"),
        ("x.json", json.dumps({"logical_count": [[1, 2], [3]]}), r"rectangular 2-D array"),
        ("x.json", json.dumps({"logical_count": [[0, 0], [0, 0]]}), r"every layer is all zero"),
        ("x.json", json.dumps({"logical_count": [1, 2, 3]}), r"must be 2-D \[num_layers, num_experts\]"),
        ("x.json", json.dumps({"logical_count": [[1, -2]]}), r"must be finite and >= 0"),
        ("x.csv", "1,2\n3,abc\n", r"cannot read loads \(ValueError: could not convert"),
        ("x.csv", "", r"must be 2-D .* and non-empty"),
    ],
)
def test_malformed_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(LoadFileError, match=message) as info:
        read_loads(path)
    assert str(info.value).startswith(str(path))
    assert isinstance(info.value, ValueError)


def test_missing_file_and_bad_tensor(tmp_path):
    with pytest.raises(LoadFileError, match="no such file"):
        read_loads(tmp_path / "absent.json")
    torch.save({"other": torch.ones(2, 2)}, tmp_path / "d.pt")
    with pytest.raises(LoadFileError, match="expected a tensor or a dict with 'logical_count'"):
        read_loads(tmp_path / "d.pt")
    torch.save(torch.ones(2, 2, 2), tmp_path / "e.pt")
    with pytest.raises(LoadFileError, match=r"got \(2, 2, 2\)"):
        read_loads(tmp_path / "e.pt")
    (tmp_path / "f.npy").write_bytes(b"garbage")
    with pytest.raises(LoadFileError, match="cannot read loads"):
        read_loads(tmp_path / "f.npy")
