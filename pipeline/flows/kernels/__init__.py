"""How the flow runs fast: kernels that compute what the reference layers in :mod:`pipeline.flows` define.

Each kernel here has a composed reference beside it and passes ``tests/flows/test_conformance.py`` against it
(values and every gradient, fp64 tight and bf16 within a stated tolerance).
"""

from .attention_lse import upper_attention_lse, upper_attention_lse_reference

__all__ = ["upper_attention_lse", "upper_attention_lse_reference"]
