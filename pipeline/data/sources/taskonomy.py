"""Taskonomy → one ``<domain>.png`` per chosen domain (``--domains``, default shade + texture + rgb).

Files are ``{domain}/point_{P}_view_{V}_domain_{domain}.png``, either directly under ``--src`` (one building,
named after the folder) or under ``--src/<building>/``. Each split is a list ``--src/<split>.txt`` whose
lines name a building folder (all its samples) or one sample (``point_3_view_1``, optionally as
``<building>/point_3_view_1`` or a full file name).

Bit depth is kept: 16-bit domains (depth_zbuffer, depth_euclidean, edge_texture, keypoints…) stay uint16,
8-bit ones uint8. Depth domains keep Taskonomy's units (1/512 m, 65535 = invalid) — converting to mm would
overflow uint16 beyond 65.5 m. A domain's dtype and channel count are probed from the split's first sample;
every other sample must match (else a ``ValueError`` naming the file). A (point, view) missing a chosen
domain raises ``FileNotFoundError`` naming the file (``--skip-bad`` skips and counts it).
Keys: ``tk-<building>-p<P:06d>-v<V:03d>``.

``--size S`` (default 0 = keep the native 512×512) resizes every domain to S×S while sharding, as TokenFusion's
translation protocol evaluates at 256×256: 8-bit domains bilinearly (PIL, as torchvision's ``Resize``), 16-bit
ones nearest-neighbour (a blend would mix the 65535 invalid marker into real values).
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
from PIL import Image

from ..codecs import read_image_file
from ..manifest import ModalitySpec
from . import Source

_NAME = re.compile(r"^point_(\d+)_view_(\d+)_domain_(.+)\.png$")
_SAMPLE = re.compile(r"^point_(?P<p>\d+)_view_(?P<v>\d+)(?:_domain_.+\.png)?$")


class TaskonomySource(Source):
    name = "taskonomy"
    OPTIONS = {
        "domains": (str, "reshading,edge_texture,rgb", "comma-separated Taskonomy domains to keep"),
        "size": (int, 0, "resize every domain to SIZE×SIZE (8-bit bilinear, 16-bit nearest); 0 = native"),
    }

    def __init__(self, src: str | None, **options: Any) -> None:
        super().__init__(src, **options)
        if not src or not os.path.isdir(src):
            raise FileNotFoundError(f"taskonomy: --src {src!r} is not a directory")
        self.domains = tuple(d.strip() for d in self.options["domains"].split(",") if d.strip())
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"taskonomy: --domains must name distinct domains, got {self.options['domains']!r}")
        if self.options["size"] < 0:
            raise ValueError(f"taskonomy: --size must be ≥ 0 (0 = native size); got {self.options['size']}")
        self._single = all(os.path.isdir(os.path.join(src, d)) for d in self.domains)
        self._samples: dict[str, dict[str, tuple[str, int, int]]] = {}
        self._specs: dict[str, dict[str, ModalitySpec]] = {}

    # -- layout ------------------------------------------------------------------------------------------
    def _building_dir(self, building: str) -> str:
        return self.src if self._single else os.path.join(self.src, building)

    def _buildings(self) -> list[str]:
        if self._single:
            return [os.path.basename(os.path.abspath(self.src))]
        return sorted(d for d in os.listdir(self.src) if os.path.isdir(os.path.join(self.src, d, self.domains[0])))

    def _scan(self, building: str) -> set[tuple[int, int]]:
        found: set[tuple[int, int]] = set()
        for domain in self.domains:
            folder = os.path.join(self._building_dir(building), domain)
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{folder}: no such domain folder")
            for entry in os.scandir(folder):
                m = _NAME.match(entry.name)
                if m and m[3] == domain:
                    found.add((int(m[1]), int(m[2])))
        return found

    def path(self, building: str, point: int, view: int, domain: str) -> str:
        return os.path.join(self._building_dir(building), domain, f"point_{point}_view_{view}_domain_{domain}.png")

    def _split_samples(self, split: str) -> dict[str, tuple[str, int, int]]:
        if split in self._samples:
            return self._samples[split]
        listing = os.path.join(self.src, f"{split}.txt")
        if not os.path.exists(listing):
            raise FileNotFoundError(f"{listing}: no such file (Taskonomy split list)")
        buildings = set(self._buildings())
        default_building = next(iter(buildings)) if self._single else None
        chosen: set[tuple[str, int, int]] = set()
        with open(listing, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                item = line.strip().rstrip("/")
                if not item:
                    continue
                if item in buildings:
                    chosen.update((item, p, v) for p, v in self._scan(item))
                    continue
                parts = item.split("/")  # point_P_view_V | <building>/point_P_view_V | <building>/<domain>/<file>
                m = _SAMPLE.match(parts[-1])
                building = parts[0] if len(parts) > 1 else default_building
                if m is None or building is None:
                    raise ValueError(f"{listing}:{lineno}: {item!r} is neither a building folder nor point_P_view_V")
                chosen.add((building, int(m["p"]), int(m["v"])))
        samples = {f"tk-{b.replace('.', '_')}-p{p:06d}-v{v:03d}": (b, p, v) for b, p, v in chosen}
        self._samples[split] = samples
        return samples

    # -- Source API --------------------------------------------------------------------------------------
    @property
    def splits(self) -> tuple[str, ...]:
        names = sorted(f[:-4] for f in os.listdir(self.src) if f.endswith(".txt"))
        return tuple(names)

    def modalities(self, split: str) -> dict[str, ModalitySpec]:
        self.check_split(split)
        if split not in self._specs:
            keys = self.keys(split)
            if not keys:
                raise ValueError(f"{os.path.join(self.src, split + '.txt')}: lists no samples")
            b, p, v = self._split_samples(split)[keys[0]]
            specs = {}
            for domain in self.domains:
                a = read_image_file(self.path(b, p, v, domain))
                kind = "depth" if domain.startswith("depth") else "image"
                bits = "16-bit" if a.dtype == np.uint16 else "8-bit"
                quant = "1/512 m, 65535 = invalid" if kind == "depth" else bits
                side = self.options["size"] or None
                specs[f"{domain}.png"] = ModalitySpec(str(a.dtype), kind, (side, side, *a.shape[2:]), quant)
            self._specs[split] = specs
        return self._specs[split]

    def keys(self, split: str) -> list[str]:
        self.check_split(split)
        return sorted(self._split_samples(split))

    def where(self, split: str, key: str) -> str:
        b, p, v = self._split_samples(split)[key]
        return self.path(b, p, v, self.domains[0])

    def load(self, split: str, key: str) -> dict[str, Any]:
        b, p, v = self._split_samples(split)[key]
        specs = self.modalities(split)
        sample = {}
        for domain in self.domains:
            path = self.path(b, p, v, domain)
            a = read_image_file(path)
            spec = specs[f"{domain}.png"]
            if str(a.dtype) != spec.dtype or a.ndim != len(spec.shape) or a.shape[2:] != spec.shape[2:]:
                raise ValueError(
                    f"{path}: {a.dtype} {a.shape} differs from the split's {domain} ({spec.dtype}, {len(spec.shape)}-D)"
                )
            sample[f"{domain}.png"] = self._resized(a)
        return sample

    def _resized(self, a: np.ndarray) -> np.ndarray:
        size = self.options["size"]
        if not size or a.shape[:2] == (size, size):
            return a
        if a.dtype == np.uint8:
            return np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.BILINEAR))
        rows = np.minimum((np.arange(size) + 0.5) * a.shape[0] / size, a.shape[0] - 1).astype(np.int64)
        cols = np.minimum((np.arange(size) + 0.5) * a.shape[1] / size, a.shape[1] - 1).astype(np.int64)
        return np.ascontiguousarray(a[rows][:, cols])

    def config(self) -> dict[str, Any]:
        return {"source": self.name, "domains": list(self.domains), "size": self.options["size"]}


SOURCE_CLASS = TaskonomySource
