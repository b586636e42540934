"""Load-file reader: every format, and clear errors for anything else."""

import datetime
import json
import os
import warnings

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


def test_sglang_per_step_counts_are_summed(tmp_path):
    steps = torch.tensor([ROWS, [[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 2, 0, 0]]], dtype=torch.float64)
    want = steps.sum(dim=0)[[1, 3]]
    (tmp_path / "a.json").write_text(json.dumps({"logical_count": steps.int().tolist()}))
    torch.save(
        {"rank": 0, "logical_count": steps.int(), "average_utilization_rate_over_window": None}, tmp_path / "b.pt"
    )
    for name in ("a.json", "b.pt"):
        loads = read_loads(tmp_path / name)
        assert torch.equal(loads.weight, want) and loads.layers == [1, 3], name
        assert loads.notes[0] == "logical_count holds 2 recorded steps; their counts are summed, as SGLang does"
    torch.save(steps, tmp_path / "c.pt")  # a bare tensor is the loads themselves: 2-D only
    with pytest.raises(LoadFileError, match=r"must be 2-D \[num_layers, num_experts\] and non-empty, got \(2, 4, 4\)"):
        read_loads(tmp_path / "c.pt")
    (tmp_path / "d.json").write_text(json.dumps({"logical_count": [steps.int().tolist()]}))
    with pytest.raises(LoadFileError, match=r"\(or 3-D \[steps, num_layers, num_experts\]\) and non-empty, got \(1, 2"):
        read_loads(tmp_path / "d.json")


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
        ("x.csv", "1,2\n3,abc\n", r"line 2, field 2: not a decimal number: 'abc'"),
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


@pytest.mark.parametrize(
    "rows, message",
    [
        ([["1", 2]], r"logical_count\[0\]\[0\] must be a number, got str '1'"),
        ([[1, 2], [3, True]], r"logical_count\[1\]\[1\] must be a number, got bool True"),
        ([[False, 1]], r"logical_count\[0\]\[0\] must be a number, got bool False"),
        ([[1, None]], r"logical_count\[0\]\[1\] must be a number, got NoneType None"),
        ([[1, {"n": 2}]], r"logical_count\[0\]\[1\] must be a number, got dict"),
        ([[1, [2, "x"]]], r"logical_count\[0\]\[1\]\[1\] must be a number, got str 'x'"),
        ([[1, "a\nb"]], r"must be a number, got str 'a\\nb'"),
        ("1,2", r"logical_count must be a number, got str"),
    ],
    ids=["string", "true", "false", "null", "object", "nested-string", "newline-string", "not-a-list"],
)
def test_json_counts_must_be_numbers(tmp_path, rows, message):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"logical_count": rows}))
    with pytest.raises(LoadFileError, match=message) as info:
        read_loads(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "array",
    [
        np.ones((2, 2), bool),
        np.ones((2, 2), np.complex128),
        np.array([["1", "2"]]),
        np.array([[b"1", b"2"]]),
        np.array([["2020-01-01"]], "datetime64[D]"),
        np.array([[1, 2]], "timedelta64[s]"),
        np.array([[1, 2]], object),
        np.zeros((2, 2), [("a", "f8")]),
    ],
    ids=["bool", "complex", "str", "bytes", "datetime", "timedelta", "object", "structured"],
)
def test_npy_dtype_must_be_integer_or_floating(tmp_path, array):
    path = tmp_path / "x.npy"
    np.save(path, array, allow_pickle=True)
    with pytest.raises(LoadFileError, match=r"real numbers \(integer or floating point\)|Object arrays") as info:
        read_loads(path)
    assert str(info.value).startswith(f"{path}: ")


def test_npy_integer_and_floating_dtypes_are_read(tmp_path):
    for dtype in (np.uint8, np.int64, np.float16, ">f8"):
        np.save(tmp_path / "x.npy", np.array([[5, 1], [0, 2]], dtype))
        assert read_loads(tmp_path / "x.npy").weight.tolist() == [[5, 1], [0, 2]], dtype


@pytest.mark.parametrize(
    "field", ["1_000", "nan", "inf", "-inf", "Infinity", "0x10", "", " ", "1e", ".", "+", "1.2.3", "1e5e3", "--1",
              "'1'", "1 2", "\u0661", "\uff11", "1\x00"],
)  # fmt: skip
def test_csv_fields_must_be_decimal_numbers(tmp_path, field):
    path = tmp_path / "x.csv"
    path.write_text(f"# loads\n1,2\n3,{field}\n", encoding="utf-8")
    with pytest.raises(LoadFileError, match=r"line 3, field 2: not a decimal number") as info:
        read_loads(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_csv_decimal_grammar(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text(" 1 ,+2.5,\t.5, 1e3 ,5.,1E-2, 0007 ,2.5e+1\n")
    assert read_loads(path).weight.tolist() == [[1.0, 2.5, 0.5, 1000.0, 5.0, 0.01, 7.0, 25.0]]


@pytest.mark.parametrize("name", ["x.json", "x.csv"])
def test_utf8_byte_order_mark_is_accepted(tmp_path, name):
    path = tmp_path / name
    text = json.dumps({"logical_count": [[5, 1], [3, 4]]}) if name.endswith(".json") else "5,1\n3,4\n"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert read_loads(path).weight.tolist() == [[5, 1], [3, 4]]


def test_non_strided_tensors_are_one_line(tmp_path):
    w = torch.tensor([[5.0, 1, 0, 2], [3, 3, 3, 4]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # creating them warns (beta, deprecated); reading them must not
        tensors = {"coo": w.to_sparse(), "csr": w.to_sparse_csr(),
                   "quantized": torch.quantize_per_tensor(w, 0.1, 0, torch.quint8)}  # fmt: skip
    for kind, t in tensors.items():
        torch.save(t, tmp_path / f"{kind}.pt")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(LoadFileError) as info:
                read_loads(tmp_path / f"{kind}.pt")
        message = str(info.value)
        assert message.startswith(f"{tmp_path / kind}.pt: loads must be a dense tensor"), message
        assert "\n" not in message and len(message) < 200, message


def test_library_errors_are_one_line(tmp_path):
    """torch's own refusal (weights_only) is many lines with terminal colours: one line here."""
    torch.save(datetime.date(2020, 1, 1), tmp_path / "x.pt")
    with pytest.raises(LoadFileError, match=r"cannot read loads \(UnpicklingError: Weights only load failed") as info:
        read_loads(tmp_path / "x.pt")
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
    torch.save([["1", 2]], tmp_path / "y.pt")  # a list, not a tensor: the same rules as JSON
    with pytest.raises(LoadFileError, match=r"loads\[0\]\[0\] must be a number, got str"):
        read_loads(tmp_path / "y.pt")


def test_control_characters_in_the_path_are_escaped(tmp_path):
    path = tmp_path / "bad\nname.json"
    path.write_text("{")
    with pytest.raises(LoadFileError) as info:
        read_loads(path)
    assert str(info.value).startswith(str(tmp_path / "bad\\nname.json: cannot read loads"))


def test_directory_is_named_as_such(tmp_path):
    for path in (tmp_path, tmp_path / "loads.json"):
        path.mkdir(exist_ok=True)
        with pytest.raises(LoadFileError, match="is a directory, not a load file") as info:
            read_loads(path)
        assert str(info.value).startswith(f"{path}: ")


def test_huge_json_integer_is_not_finite(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"logical_count": [[1' + "0" * 400 + ", 2]]}")
    with pytest.raises(LoadFileError, match="must be finite and >= 0, found a number too large for a float"):
        read_loads(path)


def test_unreadable_file_names_the_path(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("1,2\n")
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("file permissions are not enforced here (root)")
    with pytest.raises(LoadFileError, match=r"x\.csv: cannot read \(Permission denied\)$"):
        read_loads(path)
