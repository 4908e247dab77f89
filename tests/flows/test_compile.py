"""The plan's compiled path (``model.compile``): torch.compile of each MANGO block computes what eager does.

The one CI-tier test of a compiled flow (a small graph still takes tens of seconds to compile on this CPU);
speed is compared in ``benchmarks/compile_vs_native.py``, never here.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.flows import MangoFlow
from pipeline.flows.plan import ExecutionPlan

from .checker import randomise_parameters


@pytest.mark.slow
def test_a_compiled_flow_matches_eager_in_values_log_dets_gradients_and_inverse() -> None:
    torch.manual_seed(0)
    # one block with an MMCA pair and a LICA layer: every kind of node the compiler must trace, in few layers
    eager = randomise_parameters(MangoFlow(8, 16, num_blocks=1, partitions="mmca1+imca2+lica", lica_group=8), std=0.1)
    compiled = randomise_parameters(
        MangoFlow(8, 16, num_blocks=1, partitions="mmca1+imca2+lica", lica_group=8), std=0.1
    )
    plan = ExecutionPlan(compile=True)
    plan.apply(compiled)
    assert plan.effective_kernels == "python"  # the compiler traces the Python nodes, not the C++ ones
    assert "compiled (torch.compile per MANGO block)" in plan.describe(compiled)
    assert all(k == e for k, e in zip(compiled.state_dict(), eager.state_dict()))  # same names: checkpoints load
    x = torch.randn(2, 16, 8)
    outs = []
    for flow in (eager, compiled):
        xx = x.clone().requires_grad_()
        y, logdet = flow(xx)
        (y.square().sum() + logdet.sum()).backward()
        outs.append((y.detach(), logdet.detach(), xx.grad, [p.grad for p in flow.parameters()]))
    (y0, ld0, gx0, gp0), (y1, ld1, gx1, gp1) = outs
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld1, ld0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx1, gx0, rtol=1e-4, atol=1e-5)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(compiled(y1, reverse=True)[0], x, rtol=1e-4, atol=1e-4)
