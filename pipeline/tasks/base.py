"""The :class:`Task` protocol: everything that differs between ``model.task`` values, in one object.

A task is a singleton whose attributes and methods the rest of the pipeline asks instead of comparing
``model.task`` with a name (see ``docs/tasks.md``). :class:`Task` holds the defaults and the generic
pieces; :class:`LatentTask` those of the latent models (E → G → head: one or two input modalities and a
supervised target modality). This module sits low in the import layering (it imports only torch, the
flows' ``quantize`` and :mod:`pipeline.config_rules`): config, models, metrics, evaluation and tracking
import it, never the other way round. A task that needs a class from :mod:`pipeline.models` (its head)
imports it inside the method that builds it, because :mod:`pipeline.models` imports this package.

Arguments named ``cfg`` are :class:`pipeline.config.Config` objects (duck-typed here: config imports
this package for the list of task names).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from pipeline.config_rules import ConfigError

Spec = tuple[str, tuple[int, ...], int]  # (sample key, batched shape, bits)
Output = tuple[str, str, tuple[int, ...]]  # (name, numpy dtype, per-sample shape) of a served output
FieldSpec = tuple[str, str, str, tuple[int, ...], int]  # (key, kind, numpy dtype, per-sample shape, bits)


@dataclass(frozen=True)
class Modality:
    """One modality of a task: its batch key, role and what the model needs to read it.

    ``kind``: ``image`` (integer (N, C, H, W); ``bits`` 8 or 16), ``text`` (list of str), ``label`` (int64
    (N, H, W), 255 = ignore), ``vector`` (multi-hot (N, K)).
    """

    key: str
    kind: str
    channels: int = 0
    bits: int = 0


def role(shape: tuple) -> str:
    """A modality's kind from its batched shape: (C, H, W) image, (H, W) label, (K,) vector, () text."""
    return {3: "image", 2: "label", 1: "vector", 0: "text"}.get(len(shape), "unknown")


#: name → task, in registration order (filled by :mod:`pipeline.tasks`, which registers every task module)
REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add ``task`` to :data:`REGISTRY` (its name must be new)."""
    if not task.name or task.name in REGISTRY:
        raise ValueError(f"register: task name {task.name!r} is empty or taken ({list(REGISTRY)})")
    REGISTRY[task.name] = task
    return task


def names_where(attribute: str) -> list[str]:
    """The registered task names whose ``attribute`` is true, in registration order."""
    return [name for name, task in REGISTRY.items() if getattr(task, attribute)]


class Task(ABC):
    """The per-task protocol and its defaults. Subclasses set the class attributes and override methods; the
    abstract ones (:meth:`scores`, :meth:`io`) every task must define, or it cannot be instantiated."""

    #: the ``model.task`` value
    name: ClassVar[str] = ""
    #: a latent model (E → G → head, :class:`pipeline.models.LatentTaskModel`); False: the pixel-level flow
    latent: ClassVar[bool] = False
    #: dense (per-pixel) output: the fused latent grid feeds a pixel decoder, which can take skip connections
    spatial: ClassVar[bool] = False
    #: ``model.num_classes`` must be ≥ 1 and match the shards' class names
    needs_num_classes: ClassVar[bool] = False
    #: the ``model.decoder`` values this task's head accepts
    decoders: ClassVar[tuple[str, ...]] = ("direct",)
    #: ``model.gan_weight > 0`` is allowed (a discriminator on the output)
    gan: ClassVar[bool] = False
    #: the model draws samples (``forward(mode="sample")``; pyfunc ``mode=sample``, ``jobs.sample``)
    can_sample: ClassVar[bool] = False
    #: evaluation adds image-distribution distances (FID / KID, or their proxies) of the predictions
    image_distances: ClassVar[bool] = False
    #: the sum keys the model's ``forward(batch, mode="eval")`` must return (besides ``count``)
    required_sums: ClassVar[tuple[str, ...]] = ()
    #: the split-level metrics :meth:`finalize` returns (besides ``task_loss`` / ``nll``)
    metrics: ClassVar[tuple[str, ...]] = ()
    #: the headline metric (first of :attr:`metrics` a study reports) and its direction
    headline: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    #: batch prediction: how the job turns shard integers into the served input (None: they go as they are)
    prediction_dequantisation: ClassVar[str | None] = None

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    # -- config -----------------------------------------------------------------------------------------
    def check_config(self, cfg: Any) -> None:
        """The cross-field checks of ``model.*`` that depend on the task (ConfigError, one line)."""
        m = cfg.model
        if m.flow_layer != "ica" and (not self.latent or m.fusion != "mango"):
            raise ConfigError(
                f"model.flow_layer={m.flow_layer}: picks the latent models' flow G (model.fusion=mango), "
                f"not the {m.fusion if self.latent else self.name} model"
            )
        if m.skips and not self.spatial:
            raise ConfigError(
                f"model.skips: skip connections feed the dense decoders ({', '.join(names_where('spatial'))}), "
                f"not {self.name}"
            )

    def check_model(self, cfg: Any) -> None:
        """Build-time checks of ``model.gan_weight`` / ``model.decoder`` against the task (ConfigError)."""
        m = cfg.model
        if m.gan_weight and not self.gan:
            raise ConfigError(
                f"model.gan_weight: the discriminator belongs to the {'/'.join(names_where('gan'))} task, "
                f"not {self.name}"
            )

    def check_decoder(self, decoder: str) -> None:
        """ConfigError when ``model.decoder`` is another task's head."""
        if decoder != "direct" and decoder not in self.decoders:
            raise ConfigError(
                f"model.decoder={decoder!r} is a {'/'.join(t.name for t in REGISTRY.values() if decoder in t.decoders)} head; {self.name} has only model.decoder=direct"
            )

    def check_specs(self, cfg: Any, specs: Sequence[Spec]) -> None:
        """Checks of the shards' modality specs against the config before a model is built (ConfigError);
        none by default."""
        return None

    # -- model ------------------------------------------------------------------------------------------
    def layout(self, cfg: Any, specs: Sequence[Spec]) -> tuple[list[Modality], Modality]:
        """(input modalities, target modality); only the latent tasks have one."""
        raise ConfigError(f"model.task={self.name}: the {self.name} model has no input/target layout")

    def build_head(self, target: Modality, dim: int, num_inputs: int, steps: int, num_classes: int, **opts):
        """The task head of a latent model (``opts``: decoder, gan_weight, warp_*, skip_channels/stride)."""
        raise ValueError(f"no latent head for task {self.name!r}")

    # -- metrics ----------------------------------------------------------------------------------------
    @abstractmethod
    def scores(self, sums: Mapping[str, torch.Tensor], count: float) -> dict[str, float]:
        """The task's split-level metrics from sums reduced over the whole split (``count`` samples)."""

    def finalize(self, sums: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """:attr:`metrics` (+ ``task_loss`` / ``nll`` when the sums carry them); a missing sum is an error."""
        missing = [k for k in (*self.required_sums, "count") if k not in sums]
        if missing:
            raise ValueError(f"finalize({self.name!r}): the eval sums lack {missing} (they hold {sorted(sums)})")
        count = float(torch.as_tensor(sums["count"]).sum())
        out = dict(self.scores(sums, count))
        for key in ("task_loss", "nll"):
            if f"{key}_sum" in sums and count > 0:
                out[key] = float(torch.as_tensor(sums[f"{key}_sum"])) / count
        return out

    def better(self, a: float, b: float) -> bool:
        """Whether headline value ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b

    # -- evaluation figures -----------------------------------------------------------------------------
    def figures(self, ctx: Any) -> list:
        """The task's evaluation figures (PNG paths); ``ctx`` is :class:`pipeline.evaluation.FigureContext`."""
        raise ValueError(f"no figures for task {self.name!r}")

    # -- serving ----------------------------------------------------------------------------------------
    @abstractmethod
    def io(self, cfg: Any, specs: Sequence[Spec]) -> tuple[tuple[FieldSpec, ...], tuple[Output, ...]]:
        """The served request fields and response outputs (:func:`pipeline.tracking.serving.model_io`)."""

    def predict(self, model: torch.nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
        """pyfunc ``mode=predict`` on a request batch (no grad; numpy arrays out)."""
        out = model(dict(batch), mode="predict")
        return {k: v.detach().cpu().numpy() for k, v in out.items()}

    def sample(self, model: torch.nn.Module, n: int, temperature: float, seed: int) -> dict[str, Any]:
        """pyfunc ``mode=sample`` (only where :attr:`can_sample`)."""
        raise ValueError(f"the {self.name} task does not sample")

    def prediction_member(self, input_manifest: Any) -> dict[str, Any]:
        """``kind`` and the other ModalitySpec fields of a batch-prediction output member."""
        return {"kind": "target", "quantisation": None}


class LatentTask(Task):
    """A latent task: 1–2 input modalities of :attr:`input_kinds` → one target modality of :attr:`target_kind`."""

    latent = True
    #: the kind of the modality the task predicts
    target_kind: ClassVar[str] = ""
    #: the kinds of modality the encoders can read
    input_kinds: ClassVar[tuple[str, ...]] = ("image",)
    #: the target cannot be inferred from the modality kinds: ``model.target`` must name it
    target_required: ClassVar[bool] = False

    def layout(self, cfg: Any, specs: Sequence[Spec]) -> tuple[list[Modality], Modality]:
        """(input modalities, target modality), or a ConfigError saying what does not fit."""
        m = cfg.model
        mods = [
            Modality(key, role(tuple(shape)), (shape[0] or 0) if len(shape) == 3 else 0, bits)
            for key, shape, bits in specs
        ]
        target = self._target(cfg, mods)
        inputs = [md for md in mods if md is not target]
        allowed = self.input_kinds
        bad = [md.key for md in inputs if md.kind not in allowed]
        if bad or len(inputs) not in (1, 2):
            raise ConfigError(
                f"data.modalities {cfg.data.modalities}: {self.name} takes 1 or 2 input modalities of kind "
                f"{'/'.join(allowed)} besides its target {target.key}; got {[md.key for md in inputs]}"
                + (f" ({bad} cannot be inputs)" if bad else "")
            )
        for md in inputs:
            if md.kind == "image" and md.bits not in (8, 16):
                raise ConfigError(f"data.modalities: {md.key} is not an 8- or 16-bit image")
        if self.needs_num_classes and m.num_classes < 1:
            raise ConfigError(f"model.num_classes must be ≥ 1 for {self.name}")
        self.check_target(cfg, specs, target)
        return inputs, target

    def _target(self, cfg: Any, mods: list[Modality]) -> Modality:
        m, want = cfg.model, self.target_kind
        stems = {md.key.split(".")[0]: md for md in mods}
        if m.target:
            if m.target not in stems:
                raise ConfigError(f"model.target={m.target!r} is not one of data.modalities {list(stems)}")
            target = stems[m.target]
            if target.kind != want:
                raise ConfigError(
                    f"model.target={m.target!r}: {self.name} predicts a {want} modality, but {target.key} is a "
                    f"{target.kind}"
                )
            return target
        if self.target_required:
            raise ConfigError(f"model.target: {self.name} needs the modality to predict named, e.g. model.target=right")
        cands = [md for md in mods if md.kind == want]
        if len(cands) != 1:
            raise ConfigError(
                f"data.modalities {cfg.data.modalities}: {self.name} needs exactly one {want} modality to "
                f"predict; found {[c.key for c in cands]} (name it with model.target)"
            )
        return cands[0]

    def check_target(self, cfg: Any, specs: Sequence[Spec], target: Modality) -> None:
        """Task-specific checks of the target modality against the config (ConfigError); none by default."""
        return None

    @abstractmethod
    def output(self, cfg: Any, target_shape: tuple[int, ...]) -> Output:
        """The served output (name, numpy dtype, per-sample shape) for a target of ``target_shape``."""

    def io(self, cfg: Any, specs: Sequence[Spec]) -> tuple[tuple[FieldSpec, ...], tuple[Output, ...]]:
        shapes = {k: tuple(int(d) for d in s) for k, s, _ in specs}
        inputs, target = self.layout(cfg, specs)
        fields = tuple(
            (md.key, "text", "str", (), 0)
            if md.kind == "text"
            else (md.key, "image", "uint16" if md.bits == 16 else "uint8", shapes[md.key], md.bits)
            for md in inputs
        )
        return fields, (self.output(cfg, shapes[target.key]),)

    @staticmethod
    def image_inputs(model: torch.nn.Module, batch: Mapping[str, Any]) -> list[tuple[str, Any, int]]:
        """(key, images, bits) of the model's image inputs in ``batch`` (the figures' left columns)."""
        return [(md.key, batch[md.key], md.bits) for md in model.inputs if md.kind == "image"]
