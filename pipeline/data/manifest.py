"""The shard manifest: what a split holds, and the commit point of a shard job.

One JSON file per split, ``<out>/manifest-<split>.json``, lists every shard of the split with its sample count
and sha256. Readers trust only shards it lists, and the writer publishes it last (atomically), so a killed job
never yields a half-written dataset. Shard names in the manifest are relative to the manifest's folder, so a
shard store can be copied (local → S3) without rewriting it.

``manifest_checksum`` identifies the *data*: a sha256 over the canonical JSON of every field except ``args``
(how, where and with how many workers the job ran). Two manifests with the same checksum list byte-identical
shards with identical modalities; the training loop logs it and the model registry compares evaluation
manifests by it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from . import storage

FORMAT = "mango-shards/1"

#: dtypes a modality may declare (numpy names, plus the non-array encodings)
MODALITY_DTYPES = ("uint8", "uint16", "int64", "float32", "float64", "str", "json", "bytes")
#: what a modality is; the loader's default decoder keys on it (labels → int64 (H, W), images → (C, H, W))
MODALITY_KINDS = ("image", "depth", "label", "text", "target", "meta")


@dataclass(frozen=True)
class ModalitySpec:
    """One modality of a sample, as stored in the tar (before the loader decodes it).

    ``shape`` is the stored numpy layout, ``(H, W, C)`` for colour images and ``(H, W)`` for depth and labels
    (``None`` entries = varies per sample; ``None`` shape = not an array). ``quantisation`` says what one
    integer step means (e.g. ``"8-bit"``, ``"1 mm, 0 = invalid"``); ``classes`` names label values 0..K-1.
    """

    dtype: str
    kind: str
    shape: tuple[int | None, ...] | None = None
    quantisation: str | None = None
    classes: tuple[str, ...] | None = None
    ignore_index: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in MODALITY_DTYPES:
            raise ValueError(f"ModalitySpec: dtype {self.dtype!r} is not one of {MODALITY_DTYPES}")
        if self.kind not in MODALITY_KINDS:
            raise ValueError(f"ModalitySpec: kind {self.kind!r} is not one of {MODALITY_KINDS}")
        if self.shape is not None:
            object.__setattr__(self, "shape", tuple(self.shape))
        if self.classes is not None:
            object.__setattr__(self, "classes", tuple(self.classes))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape) if self.shape is not None else None
        d["classes"] = list(self.classes) if self.classes is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModalitySpec:
        return cls(**d)


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its file name (relative to the manifest), sample count, sha256 and size in bytes.

    ``first_key``/``last_key`` bound the (sorted) keys it holds; ``skipped`` counts samples ``--skip-bad``
    dropped from the key range this shard covers.
    """

    name: str
    samples: int
    sha256: str
    size: int
    first_key: str
    last_key: str
    skipped: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardInfo:
        return cls(**d)


@dataclass
class ShardManifest:
    """Everything a reader needs to know about one split; see the module docstring.

    Invariants (checked by ``validate``): shard names are unique, ``total_samples`` is the sum of the shard
    sample counts and ``skipped_samples`` equals ``len(skipped)`` (the keys ``--skip-bad`` dropped, with the
    reason, in key order; a shard whose every sample was dropped is not listed, but its skips are).
    """

    dataset: str
    split: str
    modalities: dict[str, ModalitySpec]
    samples_per_shard: int
    shards: list[ShardInfo]
    total_samples: int
    skipped_samples: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    source_config: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    #: where the manifest was read from (not serialised); shard names resolve against its folder
    location: str | None = field(default=None, compare=False, repr=False)

    # -- invariants ------------------------------------------------------------------------------------
    def validate(self) -> None:
        where = self.location or f"manifest {self.dataset}/{self.split}"
        if self.format != FORMAT:
            raise ValueError(f"{where}: unknown manifest format {self.format!r} (expected {FORMAT!r})")
        names = [s.name for s in self.shards]
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: duplicate shard names")
        if self.total_samples != sum(s.samples for s in self.shards):
            raise ValueError(f"{where}: total_samples {self.total_samples} != sum of shard sample counts")
        if len(self.skipped) != self.skipped_samples:
            raise ValueError(f"{where}: skipped_samples {self.skipped_samples} != number of skipped keys")
        if not self.modalities:
            raise ValueError(f"{where}: no modalities")

    # -- (de)serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "dataset": self.dataset,
            "split": self.split,
            "modalities": {k: v.to_dict() for k, v in sorted(self.modalities.items())},
            "samples_per_shard": self.samples_per_shard,
            "total_samples": self.total_samples,
            "skipped_samples": self.skipped_samples,
            "shards": [asdict(s) for s in self.shards],
            "skipped": list(self.skipped),
            "source_config": self.source_config,
            "args": self.args,
        }

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, fixed indent): equal manifests serialise to equal bytes."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], location: str | None = None) -> ShardManifest:
        try:
            m = cls(
                dataset=d["dataset"],
                split=d["split"],
                modalities={k: ModalitySpec.from_dict(v) for k, v in d["modalities"].items()},
                samples_per_shard=int(d["samples_per_shard"]),
                shards=[ShardInfo.from_dict(s) for s in d["shards"]],
                total_samples=int(d["total_samples"]),
                skipped_samples=int(d.get("skipped_samples", 0)),
                skipped=list(d.get("skipped", [])),
                source_config=dict(d.get("source_config", {})),
                args=dict(d.get("args", {})),
                format=d.get("format", ""),
                location=location,
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{location or 'manifest'}: malformed manifest ({exc!r})") from exc
        m.validate()
        return m

    @classmethod
    def from_json(cls, text: str | bytes, location: str | None = None) -> ShardManifest:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{location or 'manifest'}: not valid JSON ({exc})") from exc
        return cls.from_dict(d, location)

    # -- derived ---------------------------------------------------------------------------------------
    def manifest_checksum(self) -> str:
        """sha256 (hex) of the canonical JSON without ``args``: identifies the data, not the job run."""
        d = self.to_dict()
        d.pop("args")
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def shard_urls(self) -> list[str]:
        """Absolute URLs (local paths or ``s3://``) of the listed shards, resolved against ``location``."""
        if self.location is None:
            raise ValueError(f"manifest {self.dataset}/{self.split}: no location, cannot resolve shard names")
        base = storage.parent(self.location)
        return [storage.join(base, s.name) for s in self.shards]


def manifest_checksum(manifest: ShardManifest) -> str:
    """Module-level alias of :meth:`ShardManifest.manifest_checksum` (what the training loop logs)."""
    return manifest.manifest_checksum()


def manifest_name(split: str) -> str:
    """File name of a split's committed manifest, ``manifest-<split>.json``."""
    return f"manifest-{split}.json"


def part_manifest_name(split: str, task: int, num_tasks: int) -> str:
    """File name of one array task's partial manifest (never read by loaders; ``merge`` combines them)."""
    return f"manifest-{split}.part-{task:04d}-of-{num_tasks:04d}.json"


def load_manifest(url: str) -> ShardManifest:
    """Read and validate a manifest from a local path or ``s3://`` URL.

    Raises ``FileNotFoundError`` naming the URL when it does not exist (e.g. a job that never committed).
    """
    return ShardManifest.from_json(storage.read_bytes(url), location=url)
