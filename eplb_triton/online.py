"""Compatibility module: the online layer's public names, from the modules that now hold them.

Recording and dispatch live in :mod:`eplb_triton.recording`, placement algebra in
:mod:`eplb_triton.placement`, the balancer in :mod:`eplb_triton.balancer`.
"""

from .balancer import OnlineBalancer
from .placement import stable_slots
from .recording import record_dispatch, record_dispatch_reference

__all__ = ["OnlineBalancer", "record_dispatch", "record_dispatch_reference", "stable_slots"]
