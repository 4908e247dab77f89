"""Model FLOPs of a step, split by the dtype each matmul / convolution / attention ran in.

:class:`DtypeFlopCounter` is a ``TorchDispatchMode`` that prices every dispatched op with torch's own FLOP
formulas (``torch.utils.flop_counter``) and books the FLOPs under the dtype of the op's first floating-point
input. It answers two questions the training loop and ``benchmarks/flops_dtype.py`` ask:

- how much work a forward + backward is (the numerator of ``achieved_tflops`` / ``mfu``), and
- how much of it runs in bf16 under autocast (tensor-core work on a GPU) versus fp32.

torch 2.13's registry prices the CUDA attention kernels only; the CPU flash kernel
(``_scaled_dot_product_flash_attention_for_cpu`` and its backward) is priced here with the same formulas as its
CUDA twin, so a CPU count and a GPU count of the same model agree.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_sdpa_flop(query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_sdpa_backward_flop(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


#: torch's formulas plus the CPU attention kernels (op overload packet -> formula(*args, out_val=..., **kw))
FLOP_FORMULAS = {
    **flop_registry,
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
}


def _first_float_dtype(args) -> torch.dtype | None:
    for a in tree_flatten(args)[0]:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.dtype
    return None


class DtypeFlopCounter(TorchDispatchMode):
    """Count FLOPs by dtype inside ``with DtypeFlopCounter() as c: ...``; read ``c.by_dtype`` / ``c.total``.

    ``by_op`` keeps ``(op name, dtype) -> FLOPs`` for finding where fp32 work comes from.
    """

    def __init__(self):
        super().__init__()
        self.by_dtype: dict[torch.dtype, int] = defaultdict(int)
        self.by_op: dict[tuple[str, torch.dtype], int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = FLOP_FORMULAS.get(func._overloadpacket)
        if formula is not None:
            dtype = _first_float_dtype(args)
            flops = int(formula(*args, **kwargs, out_val=out))
            self.by_dtype[dtype] += flops
            self.by_op[(func._overloadpacket.__name__, dtype)] += flops
        return out

    @property
    def total(self) -> int:
        return sum(self.by_dtype.values())

    def share(self, dtype: torch.dtype) -> float:
        """Fraction of all counted FLOPs that ran in ``dtype`` (0 when nothing was counted)."""
        return self.by_dtype.get(dtype, 0) / self.total if self.total else 0.0
