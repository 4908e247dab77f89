"""The two-way IMCA layouts (``imca*r``, preset ``twoway``): exact, and B's update reads A's content."""

from __future__ import annotations

import pytest
import torch

from pipeline.flows import ICA, MangoBlock, resolve_partitions

from .checker import check_flow, randomise_parameters


def _value_path_jacobian(partition: str) -> torch.Tensor:
    """∂ y_B / ∂ x_A of one ICA layer whose attention carries no content (q = k = 0: uniform over j ≥ i), so any
    dependence of B's output on A's input can only come through the values."""
    n, d = 8, 4
    layer = ICA(d, 2 * n, partition)
    with torch.no_grad():
        layer.beta.fill_(1.0)  # α ≠ 0: the attention term is on
        for p in (
            layer.proj_q.weight,
            layer.proj_k.weight,
            layer.norm_q.weight,
            layer.norm_k.weight,
            layer.norm_q.bias,
            layer.norm_k.bias,
        ):
            p.zero_()
    x = torch.randn(1, 2 * n, d, dtype=torch.float64)
    layer = layer.double()
    jac = torch.autograd.functional.jacobian(lambda z: layer(z)[0], x)  # (1, L, D, 1, L, D)
    return jac[0, n:, :, 0, :n, :]  # rows: B's outputs, columns: A's inputs


@pytest.mark.parametrize(
    "paper, twoway", [("imca1", "imca1r"), ("imca2", "imca2r"), ("imca3", "imca3r"), ("imca4", "imca4r")]
)
def test_b_reads_a_content_only_in_the_twoway_layout(paper, twoway) -> None:
    assert _value_path_jacobian(paper).abs().max() == 0  # the paper's layout: B never sees A's values
    assert _value_path_jacobian(twoway).abs().max() > 1e-3  # the reversed one: it does


@pytest.mark.parametrize("partition", ["imca1r", "imca2r", "imca3r", "imca4r"])
def test_twoway_layouts_keep_the_flow_contract(partition) -> None:
    layer = randomise_parameters(ICA(4, 8, partition)).double()
    check_flow(layer, torch.randn(2, 8, 4, dtype=torch.float64), jacobian=True)


def test_the_twoway_preset_has_the_paper_blocks_layer_count_and_is_exact() -> None:
    assert len(resolve_partitions("twoway")) == len(resolve_partitions("all"))
    block = randomise_parameters(MangoBlock(4, 16, "twoway", lica_group=8), std=0.1).double()
    check_flow(block, torch.randn(2, 16, 4, dtype=torch.float64))
