"""Adapters that put :func:`eplb_triton.rebalance_experts` where serving frameworks call their EPLB.

* :mod:`eplb_triton.integrations.vllm`: ``EplbTritonPolicy``, a vLLM EPLB policy class
  (``vllm/distributed/eplb/policy/``), and ``register()``.
* :mod:`eplb_triton.integrations.sglang`: ``rebalance_experts`` with the signature and outputs of
  SGLang's ``deepseek`` algorithm (``sglang/srt/eplb/eplb_algorithms/deepseek.py``), and ``install()``.

Neither module needs the framework to be installed; importing this package imports neither.
"""
