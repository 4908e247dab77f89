"""The density task: the multiscale MANGO flow alone on two equal-channel image modalities."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from pipeline.flows import MultiscaleMangoFlow


class DensityModel(nn.Module):
    """Wraps :class:`MultiscaleMangoFlow` with the batch-dict interface every task model shares.

    Two modalities give the joint MANGO flow; one modality gives the single-modality baseline of the same
    layer types (its tokens split even/odd), for "does the cross-modal attention help" comparisons.

    ``forward(batch, mode=...)`` is the single entry point the engine calls (ZeRO-3 gathers weights only
    inside forward):

    - ``"loss"``: ``{"loss", "bits_per_dim"}`` — mean bits/dim of the batch (the training objective);
    - ``"eval"``: ``{"bits_per_dim_sum", "count"}`` — sums, so an exact pass reduces across ranks exactly;
    - ``"sample"``: ``{name: images}`` of ``n`` exact joint samples (continuous flow space).

    ``batch`` maps sample keys (``rgb.png``, ``right.png``) → integer images (N, C, H, W).
    """

    def __init__(self, modalities: Sequence[str], flow: MultiscaleMangoFlow):
        super().__init__()
        if len(modalities) not in (1, 2) or len(modalities) != flow.num_modalities:
            raise ValueError(
                f"density task: {len(modalities)} modalities {list(modalities)} for a flow over "
                f"{flow.num_modalities}; use two image modalities (or one for the baseline)"
            )
        self.modalities = tuple(modalities)
        self.flow = flow

    def _images(self, batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        missing = [m for m in self.modalities if m not in batch]
        if missing:
            raise ValueError(f"density batch lacks modalities {missing}; it has {sorted(batch)}")
        return [batch[m] for m in self.modalities]

    def forward(
        self,
        batch: Mapping[str, torch.Tensor] | None = None,
        *,
        mode: str = "loss",
        n: int | None = None,
        temperature: float = 1.0,
    ):
        if mode == "sample":
            return dict(zip(self.modalities, self.flow(n=n, temperature=temperature, mode="sample")))
        bpd = self.flow(*self._images(batch), mode="bits_per_dim")
        if mode == "loss":
            mean = bpd.mean()
            return {"loss": mean, "bits_per_dim": mean.detach()}
        if mode == "eval":
            # exact passes pad finished ranks with invalid samples (``__valid__`` False): count nothing twice
            valid = batch.get("__valid__")
            w = torch.ones_like(bpd) if valid is None else valid.to(bpd.device, bpd.dtype)
            return {"bits_per_dim_sum": (bpd.detach() * w).sum(), "count": w.sum()}
        raise ValueError(f"DensityModel: unknown mode '{mode}'; use loss, eval or sample")


def build_density(model_cfg, modalities: Sequence[str], bits: Sequence[int], memory: str | None = None) -> DensityModel:
    """Build the density model from ``cfg.model`` and the manifest's modality names / bit depths."""
    flow = MultiscaleMangoFlow(
        model_cfg.channels,
        model_cfg.image_size,
        model_cfg.levels,
        model_cfg.blocks_per_level,
        model_cfg.dim,
        patch_size=model_cfg.patch_size,
        bits=tuple(bits),
        num_modalities=len(modalities),
        partitions=model_cfg.partitions,
        lica_group=model_cfg.lica_group,
        memory=memory or model_cfg.memory,
        attention=model_cfg.attention,
        form=model_cfg.form,
        channel_mix=model_cfg.channel_mix,
    )
    return DensityModel(modalities, flow)
