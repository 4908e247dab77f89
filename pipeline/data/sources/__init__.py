"""Dataset sources: each turns one raw dataset layout into a stream of sample dicts for the shard writer.

A source is built from ``--src`` plus its own options and offers:

- ``splits``: the split names it knows; ``keys(split)``: the split's sample keys, sorted and stable (the
  writer cuts them into shards and array tasks into disjoint ranges, so the order must not depend on the
  file system); keys are unique within the dataset, contain no ``.`` (webdataset splits names at the
  first dot) and no ``/``.
- ``modalities(split)``: ``{name: ModalitySpec}`` — the tar member suffixes every sample carries.
- ``load(split, key)``: one sample as ``{modality: value}`` where value is a numpy array (``.png``
  modalities, ``.npy``), ``str`` (``.txt``), a JSON-able ``dict`` (``json``) or ``bytes`` (stored as is).
- ``where(split, key)``: the raw file(s) behind a sample, for error messages.
- ``config()``: the options that change the written bytes (recorded in the manifest, part of the checksum).

Per-sample problems (missing file, unreadable image, disagreeing shapes) raise ``ValueError`` or
``FileNotFoundError`` naming the file; the writer skips and counts them under ``--skip-bad``. Problems with
the dataset as a whole (wrong .mat version, missing split list) raise from the constructor and are never
skipped.

Sources are rebuilt from ``(name, src, options)`` in every writer worker, so a constructor must be cheap and
must not hold open handles a worker would inherit.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from ..manifest import ModalitySpec

#: source name -> module defining ``SOURCE_CLASS``
SOURCES = {
    "embedded": "pipeline.data.sources.embedded",
    "nyudv2": "pipeline.data.sources.nyudv2",
    "sunrgbd": "pipeline.data.sources.sunrgbd",
    "taskonomy": "pipeline.data.sources.taskonomy",
    "mmimdb": "pipeline.data.sources.mmimdb",
}


class Source(ABC):
    """Base class of the dataset sources; see the package docstring for the contract."""

    name: ClassVar[str]
    #: option name -> (type, default, help); exposed as ``--<name>`` flags by ``jobs.shard``
    OPTIONS: ClassVar[dict[str, tuple[type, Any, str]]] = {}

    def __init__(self, src: str | None, **options: Any) -> None:
        unknown = set(options) - set(self.OPTIONS)
        if unknown:
            raise ValueError(f"{self.name}: unknown option(s) {sorted(unknown)}; known: {sorted(self.OPTIONS)}")
        self.src = src
        self.options = {k: options.get(k, default) for k, (_, default, _) in self.OPTIONS.items()}

    @property
    @abstractmethod
    def splits(self) -> tuple[str, ...]: ...

    @abstractmethod
    def modalities(self, split: str) -> dict[str, ModalitySpec]: ...

    @abstractmethod
    def keys(self, split: str) -> list[str]: ...

    @abstractmethod
    def load(self, split: str, key: str) -> dict[str, Any]: ...

    def where(self, split: str, key: str) -> str:
        return f"{self.name}:{split}:{key}"

    def config(self) -> dict[str, Any]:
        """Content-affecting settings; the raw data's location is not one (it lives in the job ``args``)."""
        return {"source": self.name, **self.options}

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"{self.name}: unknown split {split!r}; this source has {list(self.splits)}")


def open_source(name: str, src: str | None, **options: Any) -> Source:
    """Build the source called ``name`` (one of ``SOURCES``) on ``src`` with its options."""
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; known: {sorted(SOURCES)}")
    module = importlib.import_module(SOURCES[name])
    return module.SOURCE_CLASS(src, **options)


def source_class(name: str) -> type[Source]:
    if name not in SOURCES:
        raise ValueError(f"unknown source {name!r}; known: {sorted(SOURCES)}")
    return importlib.import_module(SOURCES[name]).SOURCE_CLASS
