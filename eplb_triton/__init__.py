"""eplb-triton: a fast, drop-in expert-parallelism load balancer (EPLB) for MoE models.

``import eplb_triton as eplb`` replaces DeepSeek's ``eplb`` module: same functions, arguments
and outputs (docs/algorithm.md), with a vectorised CPU path and Triton kernels for CUDA tensors.
"""

from ._validation import EplbArgumentError
from .api import balanced_packing, rebalance_experts, rebalance_experts_hierarchical, replicate_experts
from .balancer import OnlineBalancer
from .distributed import RearrangeStats, ReplicaSyncStats, rearrange_expert_weights, sync_replica_grads
from .placement import initial_placement, stable_slots
from .planner import EplbPlanner
from .recording import dispatch, record_dispatch

__all__ = [
    "EplbArgumentError",
    "EplbPlanner",
    "OnlineBalancer",
    "RearrangeStats",
    "ReplicaSyncStats",
    "initial_placement",
    "rearrange_expert_weights",
    "sync_replica_grads",
    "dispatch",
    "record_dispatch",
    "stable_slots",
    "balanced_packing",
    "rebalance_experts",
    "rebalance_experts_hierarchical",
    "replicate_experts",
]
__version__ = "0.1.0"
