"""The README's Python snippets: the runnable ones are run (with stand-ins for vLLM and SGLang,
which CI does not install), the rest (they need a GPU or a training loop) must at least compile."""

import contextlib
import io
import re
import sys
import types
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def _block(marker: str) -> str:
    (block,) = [b for b in BLOCKS if marker in b]
    return block


def _stub_modules(monkeypatch, dotted: str, **attrs) -> types.ModuleType:
    parts = dotted.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    leaf = sys.modules[dotted]
    for k, v in attrs.items():
        setattr(leaf, k, v)
    return leaf


def test_every_snippet_compiles():
    assert len(BLOCKS) >= 4
    for block in BLOCKS:
        compile(block, "README.md", "exec")


def test_usage_snippet_prints_what_it_says():
    block = _block("import eplb_triton as eplb  # instead of: import eplb")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(block, {})
    expected = re.search(r"print\(.*\)  # (.*)", block).group(1)
    assert out.getvalue().strip() == expected


def test_vllm_snippet_registers_the_policy(monkeypatch):
    policies = {}
    _stub_modules(monkeypatch, "vllm.distributed.eplb.policy", EPLB_POLICIES=policies)
    exec(_block("eplb_vllm.register()"), {})
    from eplb_triton.integrations.vllm import EplbTritonPolicy

    assert policies == {"default": EplbTritonPolicy}


def test_sglang_snippet_installs_the_algorithm(monkeypatch):
    deepseek = _stub_modules(monkeypatch, "sglang.srt.eplb.eplb_algorithms.deepseek", rebalance_experts=None)
    exec(_block("eplb_sglang.install()"), {})
    from eplb_triton.integrations import sglang

    assert deepseek.rebalance_experts is sglang.rebalance_experts


@pytest.mark.parametrize("marker", ["EplbPlanner(", "OnlineBalancer("])
def test_gpu_and_training_loop_snippets_name_real_api(marker):
    import eplb_triton

    block = _block(marker)
    for name in re.findall(r"eplb\.(\w+)\(", block):
        assert hasattr(eplb_triton, name), name
