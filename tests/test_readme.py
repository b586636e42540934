"""The README's Python snippets: the runnable ones are run (with stand-ins for vLLM and SGLang,
which CI does not install), the rest (they need a GPU or a training loop) must at least compile."""

import contextlib
import io
import re
import sys
import types
from pathlib import Path

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
    assert len(BLOCKS) >= 3
    for block in BLOCKS:
        compile(block, "README.md", "exec")


def test_usage_snippet_prints_what_it_says():
    block = _block("import eplb_triton as eplb  # instead of: import eplb")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(block, {})
    expected = re.search(r"print\(.*\)  # (.*)", block).group(1)
    assert out.getvalue().strip() == expected


def test_integration_snippet_registers_the_policy_and_installs_the_algorithm(monkeypatch):
    policies = {}
    _stub_modules(monkeypatch, "vllm.distributed.eplb.policy", EPLB_POLICIES=policies)
    deepseek = _stub_modules(monkeypatch, "sglang.srt.eplb.eplb_algorithms.deepseek", rebalance_experts=None)
    exec(_block("eplb_vllm.register()"), {})
    from eplb_triton.integrations import sglang
    from eplb_triton.integrations.vllm import EplbTritonPolicy

    assert policies == {"default": EplbTritonPolicy}
    assert deepseek.rebalance_experts is sglang.rebalance_experts


def test_online_loop_snippet_runs_in_one_process():
    # The loop as written, in one process (no process group): 200 steps of one skewed routing, so
    # the plan at step 200 changes the placement and the weights move in-process with their SGD
    # momentum. The loader stands in for the backward pass: it gives every slot the gradient 1.
    import torch

    import eplb_triton as eplb

    block = _block("OnlineBalancer(")
    L, E, R = 58, 256, 288
    gen = torch.Generator().manual_seed(0)
    hot = torch.multinomial(torch.linspace(1.0, 30.0, E) ** 3, 8 * 64, replacement=True, generator=gen)
    # one parameter per layer, slot-major: slot q holds its expert's id in column 0
    start = eplb.OnlineBalancer(L, E, R, 8, 4, 32, device="cpu").phy2log
    weights = [torch.nn.Parameter(torch.stack([p.double(), torch.zeros(R, dtype=torch.float64)], 1)) for p in start]
    optimizer = torch.optim.SGD(weights, lr=0.0, momentum=0.5)

    def loader():
        for step in range(200):
            for w in weights:
                w.grad = torch.ones_like(w)
            yield step

    namespace = {
        "eplb": eplb, "ep_group": None, "loader": loader(), "layer": 3, "topk_ids": hot.view(64, 8),
        "expert_weights": weights, "optimizer": optimizer,
    }  # fmt: skip
    exec(block, namespace)
    balancer, old = namespace["balancer"], namespace["old"]
    assert balancer.last_replanned[3] and not torch.equal(balancer.phy2log[3], start[3])
    assert torch.equal(old, balancer.phy2log)
    for layer, w in enumerate(weights):
        assert torch.equal(w.detach()[:, 0].long(), balancer.phy2log[layer]), layer
        # every slot's momentum is its expert's: the summed gradient (copies of it when the step
        # ran), the same on every copy, and it moved with the slot
        buf = optimizer.state[w]["momentum_buffer"][:, 0]
        copies = torch.bincount(start[layer], minlength=E).double()
        assert torch.allclose(buf, copies[balancer.phy2log[layer]] * 2.0, rtol=1e-12), layer


def test_training_loop_snippet_names_real_api():
    import eplb_triton

    for name in re.findall(r"eplb\.(\w+)\(", _block("OnlineBalancer(")):
        assert hasattr(eplb_triton, name), name


def test_readme_stays_short():
    assert len(README) <= 12_000, f"README.md has {len(README)} characters"
