"""Named deployment configurations used by the benchmark, the command line and the GPU check."""

from __future__ import annotations

from dataclasses import dataclass

from ._validation import select_policy


@dataclass(frozen=True)
class Deployment:
    """One placement problem: ``experts`` logical experts, ``replicas`` slots on ``gpus`` GPUs in
    ``nodes`` nodes, ``groups`` expert groups; ``layers`` is the model's MoE layer count."""

    name: str
    experts: int
    replicas: int
    groups: int
    nodes: int
    gpus: int
    layers: int

    @property
    def args(self) -> tuple[int, int, int, int]:
        """``(num_replicas, num_groups, num_nodes, num_gpus)`` for :func:`rebalance_experts`."""
        return self.replicas, self.groups, self.nodes, self.gpus

    @property
    def policy(self) -> str:
        """``"hierarchical"`` or ``"global"``: the one rule, :func:`eplb_triton._validation.select_policy`."""
        return select_policy(self.groups, self.nodes)[0]

    def fitting(self, files: list) -> list:
        """The load files (:class:`eplb_triton.io.Loads`) with this deployment's expert count."""
        return [f for f in files if f.weight.shape[1] == self.experts]


# The DeepSeek-V3 deployments of ../shared/data/README.md (58 MoE layers, 256 experts, 8 groups).
DEEPSEEK_V3 = {
    d.name: d
    for d in (
        Deployment("prefill-EP32", 256, 288, 8, 4, 32, 58),
        Deployment("prefill-EP32-global", 256, 288, 1, 1, 32, 58),
        Deployment("decode-EP64", 256, 320, 8, 1, 64, 58),
        Deployment("decode-EP144", 256, 288, 8, 18, 144, 58),
        Deployment("EP8-no-redundancy", 256, 256, 1, 1, 8, 58),
    )
}

# Models for the latency sweep. Qwen3 and Kimi K2 route without expert groups (G = 1); the replica
# counts add one redundant slot per GPU (Qwen3-235B: 4 -> 5 slots per GPU; Kimi K2: 6 -> 7).
MODELS = {
    d.name: d
    for d in (
        Deployment("deepseek-v3-prefill-ep32", 256, 288, 8, 4, 32, 58),
        Deployment("deepseek-v3-decode-ep64", 256, 320, 8, 1, 64, 58),
        Deployment("deepseek-v3-decode-ep144", 256, 288, 8, 18, 144, 58),
        Deployment("qwen3-235b-ep32", 128, 160, 1, 4, 32, 94),
        Deployment("kimi-k2-ep64", 384, 448, 1, 8, 64, 60),
    )
}
