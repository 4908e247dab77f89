"""The latent task model: per-modality encoders E → tokens on a fixed grid → G (MangoFlow) → Z → fuse → head.

For M = 2 input modalities A, B of n tokens each (width D), the flow input is ``x = [E_A ; E_B]`` (N, 2n, D)
and ``z, logdet = G(x)``; Z is split back per modality, fused (segmentation/translation: the per-modality grids
concatenated along channels and mixed by a 1×1 conv; classification: per-modality pooling in the head), and
the task head produces the output. With M = 1 (the single-modality baseline) G runs on the one modality's
tokens split even/odd, as the density baseline does. ``fusion="concat"`` is the no-flow baseline: the same
encoders, fusion and head with Z = x (no G, no NLL).

**Objective** ``loss = task_loss + λ · NLL(x)/(L·D)`` (λ = ``model.nll_weight``; NLL in nats, standard normal
prior on z). The NLL's gradient is *stopped into the encoders*: E's Jacobian is not part of the likelihood, so
letting the NLL train E would let it shrink the token scale and cheat the density. The flow's parameters
receive both gradients. ``model.nll_to_encoders=true`` lets the NLL's gradient reach E (one flow pass, no
detached copy) — a lever the fusion study (``benchmarks/fusion.py``) measures. Implementation: one flow call on the batch ``[x ; x.detach()]`` (2N
samples); the first half's Z feeds the head (task gradient into G and E), the second half's ``(z, logdet)``
gives the NLL (gradient into G only). Under ``no_grad`` (eval, predict, ActNorm data init) one pass over x
serves both.

``forward(batch, mode)`` — the task-model contract (``pipeline/models/__init__.py``):

- ``"loss"`` → ``{"loss", "task_loss", "nll"}`` (+ ``gan_g``/``gan_d`` when the GAN is on); all but ``loss``
  detached. Training-time augmentation (``data.crop_size`` …) is applied here, in training mode only.
- ``"eval"`` → the head's sums (``confusion`` | ``abs_err_sum``, ``sq_err_sum``, ``numel`` | ``tp``, ``fp``,
  ``fn``, ``samples_f1_sum``) + ``task_loss_sum``, ``nll_sum`` (per-sample values summed) + ``count``; every
  sum counts only samples with ``batch["__valid__"]`` True.
- ``"predict"`` → ``{"pred"}`` (segmentation (N, H, W) int64, translation (N, C, H, W) in [0, 1]) or
  ``{"probs"}`` (classification (N, K)); the target may be absent from the batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from pipeline.flows import ActNorm, AffineCoupling, ChannelMixer, FlowSequence, MangoFlow, token_mask
from pipeline.tasks import Modality, get_task, task_names

from .augment import Augment
from .encoders import ImageEncoder
from .text import TextEncoder
from .xattn import CrossAttentionFusion

FUSIONS = ("mango", "concat", "xattn")
DECODERS = (
    "direct",
    "warp",
    "select",
)  # translation heads: TranslationHead, WarpTranslationHead, SelectTranslationHead
MODES = ("loss", "eval", "predict")


class LatentTaskModel(nn.Module):
    """See the module docstring. ``inputs``: 1 or 2 modalities (image/text); ``target``: the supervised one."""

    def __init__(
        self,
        task: str,
        inputs: Sequence[Modality],
        target: Modality,
        head: nn.Module,
        *,
        dim: int,
        grid: tuple[int, int],
        encoder: str = "conv",
        patch_size: int = 4,
        fusion: str = "mango",
        nll_weight: float = 1e-2,
        nll_to_encoders: bool = False,
        depth_max: float = 10000.0,
        text_trainable: bool = False,
        text_cache: int = 0,
        augment: Augment | None = None,
        flow_kwargs: Mapping | None = None,
        xattn_kwargs: Mapping | None = None,
        skips: bool = False,
        pad_mask: bool = False,
    ):
        super().__init__()
        if len(inputs) not in (1, 2):
            raise ValueError(f"{task}: the latent model takes 1 or 2 input modalities; got {[m.key for m in inputs]}")
        if fusion not in FUSIONS:
            raise ValueError(f"{task}: fusion must be one of {list(FUSIONS)}; got {fusion!r}")
        spatial = get_task(task).spatial  # dense output: the per-modality grids are fused by a 1×1 conv
        self.task, self.inputs, self.target = task, tuple(inputs), target
        self.dim, self.grid, self.fusion, self.nll_weight = dim, tuple(grid), fusion, float(nll_weight)
        self.nll_to_encoders = bool(nll_to_encoders)  # the fusion study's lever (model.nll_to_encoders)
        self.pad_mask = bool(pad_mask)  # padded text tokens held fixed by G and out of the NLL (model.pad_mask)
        self.depth_max, self.augment = float(depth_max), augment or Augment()
        self.skips = bool(skips)  # the head also reads the image encoders' feature maps (model.skips)
        if self.skips and (not spatial or any(m.kind != "image" for m in inputs)):
            raise ValueError(f"{task}: skip connections (model.skips) need a dense task with image inputs only")
        n = grid[0] * grid[1]
        self.tokens_per_modality = n
        self.encoders = self._encoders(encoder, patch_size, text_trainable, text_cache)
        self.flow = self._token_flow(flow_kwargs) if fusion == "mango" else None
        # the non-invertible baseline: bidirectional cross-attention blocks where G would be (pipeline.models.xattn)
        self.xattn = CrossAttentionFusion(dim, **dict(xattn_kwargs or {})) if fusion == "xattn" else None
        self.fuse = nn.Conv2d(dim * len(inputs), dim, 1) if spatial else None
        self.head = head
        self.source = self._source(head)  # the input a warping head moves pixels of: one of the target's kind

    def _encoders(self, encoder: str, patch_size: int, text_trainable: bool, text_cache: int) -> nn.ModuleDict:
        """One encoder per input modality (image: conv / MiT; text: MiniLM), keyed by :func:`_name`."""
        encoders = nn.ModuleDict()
        for m in self.inputs:
            if m.kind == "image":
                encoders[_name(m.key)] = ImageEncoder(
                    encoder, m.channels, m.bits, self.dim, self.grid, patch_size, self.depth_max
                )
            elif m.kind == "text":
                encoders[_name(m.key)] = TextEncoder(
                    self.tokens_per_modality, self.dim, trainable=text_trainable, cache=text_cache
                )
            else:
                raise ValueError(
                    f"{self.task}: input {m.key!r} of kind {m.kind!r} cannot be encoded; use image or text modalities"
                )
        return encoders

    def _token_flow(self, flow_kwargs: Mapping | None) -> nn.Module:
        """G on the tokens of every input; one modality: its [even ; odd] tokens play the two modalities."""
        n, length = self.tokens_per_modality, self.tokens_per_modality * len(self.inputs)
        kwargs = dict(flow_kwargs or {})
        layer = kwargs.pop("layer", "ica")  # model.flow_layer: MANGO blocks, or a Table 4 comparator
        flow = (
            MangoFlow(self.dim, length, **kwargs)
            if layer == "ica"
            else token_flow(layer, self.dim, length, kwargs.get("num_blocks", 12))
        )
        if len(self.inputs) == 1:
            order = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)])
            self.register_buffer("order", order, persistent=False)
            self.register_buffer("unorder", torch.argsort(order), persistent=False)
        return flow

    def _source(self, head: nn.Module) -> Modality | None:
        """The input image a warping head moves pixels of (channels and bits of the target's), else None."""
        if not getattr(head, "needs_source", False):
            return None
        target = self.target
        fits = [m for m in self.inputs if m.kind == "image" and (m.channels, m.bits) == (target.channels, target.bits)]
        if not fits:
            raise ValueError(
                f"{self.task}: model.decoder={type(head).__name__} warps an input image like the target {target.key} "
                f"({target.channels} channels, {target.bits}-bit); the inputs are "
                f"{[(m.key, m.channels, m.bits) for m in self.inputs]}"
            )
        return fits[0]

    # -- pieces ---------------------------------------------------------------------------------------
    def backbone_parameter_names(self) -> set[str]:
        """Names of the parameters of the parts a published checkpoint initialises (MiT encoders, MiniLM); the
        optimizer gives every other parameter ``optim.lr · optim.new_lr_mult`` (TokenFusion's ×10 for new parts)."""
        names = set()
        for key, enc in self.encoders.items():
            if isinstance(enc, ImageEncoder):
                if enc.kind != "conv":
                    names.update(f"encoders.{key}.encoder.{n}" for n, _ in enc.encoder.named_parameters())
            elif isinstance(enc, TextEncoder):
                names.update(f"encoders.{key}.bert.{n}" for n, _ in enc.bert.named_parameters())
        return names

    @staticmethod
    def _skip_maps(maps: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Per stride, the maps of every input modality concatenated along channels (finest first)."""
        return [torch.cat(level, dim=1) if len(level) > 1 else level[0] for level in zip(*maps, strict=True)]

    def _encode(
        self, batch: Mapping[str, object], maps: list | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        tokens, masks = [], []
        for m in self.inputs:
            enc = self.encoders[_name(m.key)]
            if maps is not None:  # skip connections: keep the feature maps the tokens are pooled from
                feats = enc.features(batch[m.key])
                maps.append(feats)
                tokens.append(enc.tokenizer(feats))
                masks.append(None)
                continue
            out = enc(batch[m.key])
            if isinstance(out, tuple):
                tokens.append(out[0])
                masks.append(out[1])
            else:
                tokens.append(out)
                masks.append(None)
        return tokens, masks

    def _flow(
        self, tokens: list[torch.Tensor], stop_into_encoders: bool, masks: list[torch.Tensor | None] | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Z per modality and the per-sample NLL/(L·D) (None without a flow); with ``pad_mask`` padded tokens
        are held fixed by G and left out of the NLL (L·D counts the real tokens)."""
        if self.xattn is not None:
            return self.xattn(tokens, masks or [None] * len(tokens)), None
        if self.flow is None:
            return tokens, None
        x = torch.cat(tokens, dim=1) if len(tokens) == 2 else tokens[0][:, self.order]
        mask = self._flow_mask(tokens, masks) if self.pad_mask else None
        n = x.shape[0]
        if stop_into_encoders:
            with token_mask(None if mask is None else torch.cat([mask, mask])):
                z_all, ld_all = self.flow(torch.cat([x, x.detach()], dim=0))
            z, nll = z_all[:n], self.nll_per_dim(z_all[n:], ld_all[n:], mask)
        else:
            with token_mask(mask):
                z, logdet = self.flow(x)
            nll = self.nll_per_dim(z, logdet, mask)
        zs = list(z.chunk(2, dim=1)) if len(tokens) == 2 else [z[:, self.unorder]]
        return zs, nll

    def _flow_mask(self, tokens: list[torch.Tensor], masks: list[torch.Tensor | None] | None) -> torch.Tensor | None:
        """G's padding mask (N, L) in its token order, or None when no input has padding (images)."""
        if not masks or all(m is None for m in masks):
            return None
        full = [
            m.to(t.device, torch.bool) if m is not None else torch.ones(t.shape[:2], dtype=torch.bool, device=t.device)
            for t, m in zip(tokens, masks)
        ]
        return torch.cat(full, dim=1) if len(full) == 2 else full[0][:, self.order]

    @staticmethod
    def nll_per_dim(z: torch.Tensor, logdet: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) −log p(x)/(L·D) in nats under a standard normal prior on z (fp32 or better); with a padding
        mask, over the real tokens only (their count × D)."""
        z = z.to(torch.float64 if z.dtype == torch.float64 else torch.float32)
        if mask is None:
            dims = torch.full((z.shape[0],), float(z.shape[1] * z.shape[2]), dtype=z.dtype, device=z.device)
            sq = (z * z).flatten(1).sum(1)
        else:
            dims = mask.sum(1).to(z.dtype) * z.shape[2]
            sq = (z * z * mask.unsqueeze(-1).to(z.dtype)).flatten(1).sum(1)
        log_pz = -0.5 * sq - 0.5 * dims * math.log(2 * math.pi)
        return -(log_pz + logdet.to(z.dtype)) / dims

    def _head(
        self,
        zs: list[torch.Tensor],
        masks: list[torch.Tensor | None],
        size: tuple[int, int] | None,
        batch: Mapping[str, object],
        skips: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if self.fuse is None:
            return self.head(zs, masks)
        n, (gh, gw) = zs[0].shape[0], self.grid
        grids = [z.transpose(1, 2).reshape(n, self.dim, gh, gw) for z in zs]
        fused = self.fuse(torch.cat(grids, dim=1))
        extra = {"skips": skips} if skips is not None else {}
        if self.source is None:
            return self.head(fused, size, **extra)
        source = self.encoders[_name(self.source.key)].scaled(batch[self.source.key])  # [0, 1], like the target
        return self.head(fused, size, source, **extra)

    def _target(self, batch: Mapping[str, object]) -> torch.Tensor:
        t = batch[self.target.key]
        if self.target.kind == "label":
            return t.long()
        if self.target.kind == "image":
            x = t.float()
            return x / 255.0 if self.target.bits == 8 else (x / self.depth_max).clamp(0.0, 1.0)
        return t.float()

    def _augmented(self, batch: Mapping[str, object], with_target: bool) -> Mapping[str, object]:
        keys = [m.key for m in self.inputs if m.kind == "image"]
        if with_target and self.target.kind in ("image", "label"):
            keys.append(self.target.key)
        nearest = {m.key for m in (*self.inputs, self.target) if m.kind == "image" and m.bits == 16}
        return {**batch, **self.augment({k: batch[k] for k in keys}, nearest)}

    # -- the entry point ------------------------------------------------------------------------------
    def forward(self, batch: Mapping[str, object], mode: str = "loss"):
        if mode not in MODES:
            raise ValueError(f"{type(self).__name__}({self.task}): unknown mode {mode!r}; use one of {list(MODES)}")
        need = [m.key for m in self.inputs] + ([self.target.key] if mode != "predict" else [])
        missing = [k for k in need if k not in batch]
        if missing:
            raise ValueError(
                f"{self.task} batch lacks {missing}; it has {sorted(k for k in batch if not k.startswith('__'))}"
            )
        if mode == "loss" and self.training and self.augment.active:
            batch = self._augmented(batch, with_target=True)
        maps: list | None = [] if self.skips else None
        tokens, masks = self._encode(batch, maps)
        stop = mode == "loss" and torch.is_grad_enabled() and self.nll_weight > 0 and not self.nll_to_encoders
        zs, nll = self._flow(tokens, stop_into_encoders=stop, masks=masks)
        size = next((tuple(batch[m.key].shape[-2:]) for m in self.inputs if m.kind == "image"), None)
        out = self._head(zs, masks, size, batch, self._skip_maps(maps) if maps is not None else None)
        if mode == "predict":
            return self.head.predict(out)
        target = self._target(batch)
        task_loss, per_sample, *extra = self.head.loss(out, target)
        if mode == "loss":
            loss = task_loss + (self.nll_weight * nll.mean() if nll is not None and self.nll_weight > 0 else 0.0)
            result = {"loss": loss, "task_loss": task_loss.detach()}
            if nll is not None:
                result["nll"] = nll.mean().detach()
            return result | (extra[0] if extra else {})
        valid = batch.get("__valid__")
        w = (
            torch.ones(per_sample.shape[0], device=per_sample.device)
            if valid is None
            else torch.as_tensor(valid, device=per_sample.device).to(per_sample.dtype)
        )
        sums = self.head.sums(out.detach(), target, w.bool())
        sums["task_loss_sum"] = (per_sample.detach().double() * w.double()).sum()
        if nll is not None:
            sums["nll_sum"] = (nll.detach().double() * w.to(nll.device).double()).sum()
        sums["count"] = w.double().sum()
        return sums


def token_flow(layer: str, dim: int, tokens: int, num_blocks: int) -> FlowSequence:
    """The flow-layer comparators of the paper's Table 4 as G on (N, tokens, dim), from the flow's own layers.

    ``coupling``: ``num_blocks`` × (ActNorm → affine coupling over channels, halves alternating) — RealNVP-style;
    ``glow``: ``num_blocks`` × (ActNorm → learned invertible channel mixer (Glow's 1×1 conv) → affine coupling).
    Neither has ICA's cross-token attention: tokens meet only inside the coupling's 3-tap conditioner along the
    token sequence. Exact, with log-dets; ActNorm's data init and the NLL work as for MANGO blocks.
    """
    if layer not in ("coupling", "glow"):
        raise ValueError(f"token_flow: layer must be coupling or glow; got {layer!r}")
    layers: list[nn.Module] = []
    for i in range(num_blocks):
        layers.append(ActNorm(dim))
        if layer == "glow":
            layers.append(ChannelMixer(dim))
        layers.append(AffineCoupling(dim, max(dim, 16), swap=bool(i % 2)))
    return FlowSequence(layers, tokens=tokens, dim=dim)


def _name(key: str) -> str:
    """A ModuleDict-safe name for a batch key (``rgb.png`` → ``rgb``)."""
    return key.split(".")[0].replace("-", "_")


def build_head(
    task: str,
    target: Modality,
    dim: int,
    num_inputs: int,
    steps: int,
    num_classes: int,
    gan_weight: float = 0.0,
    decoder: str = "direct",
    warp_range: int = 16,
    warp_generate: bool = False,
    skip_channels: Sequence[int] | None = None,
    skip_stride: int = 1,
) -> nn.Module:
    """The head of latent ``task`` (:meth:`pipeline.tasks.base.Task.build_head`); ``decoder`` picks among the
    task's decoders (translation: direct | warp | select).

    ``skip_channels`` (per stride, finest first, summed over the input modalities) turns on the skip decoder
    (``model.skips``); ``skip_stride`` is the finest map's stride, from which translation refines to full size.
    """
    if decoder not in DECODERS:
        raise ValueError(f"{task}: model.decoder must be one of {list(DECODERS)}; got {decoder!r}")
    spec = get_task(task)
    if decoder not in spec.decoders:
        owners = "/".join(t for t in task_names() if decoder in get_task(t).decoders)
        raise ValueError(f"model.decoder={decoder!r} is a {owners} head; {task} has no {decoder} decoder")
    if skip_channels and not spec.spatial:
        raise ValueError(f"model.skips: {task} has no dense decoder to take skip connections")
    opts = {"gan_weight": gan_weight, "decoder": decoder, "warp_range": warp_range, "warp_generate": warp_generate}
    return spec.build_head(
        target, dim, num_inputs, steps, num_classes, skip_channels=skip_channels, skip_stride=skip_stride, **opts
    )
