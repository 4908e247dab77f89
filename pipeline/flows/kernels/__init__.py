"""How the flow runs fast: implementations of what the layers in :mod:`pipeline.flows` define.

The layers (``actnorm``, ``channel_mix``, ``coupling``, ``ica`` + ``partitions`` + ``lica``, ``mango``,
``multiscale``) hold the one readable definition of each computation; the plan (:mod:`pipeline.flows.plan`)
decides which implementation below runs. Every one passes the shared conformance suite
(``tests/flows/test_conformance.py``: values, log-dets, every gradient in fp64, reverse, ZeRO-3-flagged
parameters, bf16 autocast) against the layer's composed reference (``model.kernels=reference``).

============================  ===================================================  =========================
kernel                        what it runs                                         when (the plan)
============================  ===================================================  =========================
``native`` (``csrc/*.cpp``)   C++ autograd nodes: gated ICA core, LICA block        fp32, not ZeRO-3,
                              mixer, channel mixer, affine coupling; the gated      ``kernels=auto``, built
                              inverse's back-substitution. On the CPU their
                              memory-bound steps are single-pass loops (gathers
                              with the fused ActNorm, merge, product-form
                              log-det, q/k LayerNorms, in-place mask, unfold;
                              ``docs/flows.md``), elsewhere ATen ops
``ica_nodes``                 Python autograd nodes of the gated ICA                fp32, ``kernels=python`` or
                              (``GatedICACore``, ``GatedUpperAttention``)           no C++ build; ZeRO-3
``attention``                 fp32 SDPA for ``A x2`` + chunked diagonal             fp32, ``attention=fused``
                              log-softmax (no n×n tensor saved)
``attention_lse``             bf16 flash attention returning the row                bf16 autocast
                              log-sum-exp with a gradient (one pass)
============================  ===================================================  =========================
"""

from .attention_lse import upper_attention_lse, upper_attention_lse_reference

__all__ = ["upper_attention_lse", "upper_attention_lse_reference"]
