"""MM-IMDB → ``rgb.png`` (poster), ``text.txt`` (plot), ``labels.npy`` (23-genre multi-hot), ``json``.

Layout under ``--src``: ``split.json`` (``{"train": [ids], "dev": [ids], "test": [ids]}``; 15,552 / 2,608 /
7,799) and ``dataset/{id}.json`` + ``dataset/{id}.jpeg``. The text is the longest entry of ``plot``;
``labels.npy`` is uint8 (23,) in ``GENRES`` order (genres outside the 23 are dropped from it but kept in
the ``json`` metadata). Posters come in many sizes, so they are resized (shorter side → ``--image-size``,
bicubic) and centre-cropped to a square; ``--image-size 0`` keeps them as they are (then the loader cannot
stack them into batches). Keys: ``imdb-<id>``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image

from ..codecs import read_image_file
from ..manifest import ModalitySpec
from . import Source

#: the 23 MM-IMDB genres, most frequent first (the order of the MM-IMDB benchmark's label vectors)
GENRES = (
    "Drama",
    "Comedy",
    "Romance",
    "Thriller",
    "Crime",
    "Action",
    "Adventure",
    "Horror",
    "Documentary",
    "Mystery",
    "Sci-Fi",
    "Fantasy",
    "Family",
    "Biography",
    "War",
    "History",
    "Music",
    "Animation",
    "Musical",
    "Western",
    "Sport",
    "Short",
    "Film-Noir",
)


def square_resize(img: np.ndarray, size: int) -> np.ndarray:
    """Resize so the shorter side is ``size`` (bicubic), then centre-crop to (size, size, 3)."""
    h, w = img.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.Resampling.BICUBIC))
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(resized[top : top + size, left : left + size])


class MMIMDBSource(Source):
    name = "mmimdb"
    OPTIONS = {"image_size": (int, 256, "poster side length after resize + centre crop (0 = keep original)")}

    def __init__(self, src: str | None, **options: Any) -> None:
        super().__init__(src, **options)
        if not src or not os.path.isdir(src):
            raise FileNotFoundError(f"mmimdb: --src {src!r} is not a directory")
        split_path = os.path.join(src, "split.json")
        if not os.path.exists(split_path):
            raise FileNotFoundError(f"{split_path}: no such file (MM-IMDB split)")
        split = _read_json(split_path)
        if not isinstance(split, dict) or not all(isinstance(v, list) for v in split.values()):
            raise ValueError(f"{split_path}: expected {{split: [ids]}}")
        self._ids = {name: sorted(str(i) for i in ids) for name, ids in split.items()}
        if self.options["image_size"] < 0:
            raise ValueError(f"mmimdb: --image-size must be >= 0, got {self.options['image_size']}")

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(sorted(self._ids))

    def modalities(self, split: str) -> dict[str, ModalitySpec]:
        self.check_split(split)
        s = self.options["image_size"] or None
        return {
            "rgb.png": ModalitySpec("uint8", "image", (s, s, 3), "8-bit sRGB poster"),
            "text.txt": ModalitySpec("str", "text", None, "UTF-8, longest plot entry"),
            "labels.npy": ModalitySpec("uint8", "target", (len(GENRES),), "multi-hot", GENRES),
            "json": ModalitySpec("json", "meta"),
        }

    def keys(self, split: str) -> list[str]:
        self.check_split(split)
        return [f"imdb-{i}" for i in self._ids[split]]

    def where(self, split: str, key: str) -> str:
        return os.path.join(self.src, "dataset", key[len("imdb-") :] + ".json")

    def load(self, split: str, key: str) -> dict[str, Any]:
        movie_id = key[len("imdb-") :]
        meta_path = self.where(split, key)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"{meta_path}: no such file")
        meta = _read_json(meta_path)
        plots = [p for p in meta.get("plot") or [] if isinstance(p, str) and p.strip()]
        if not plots:
            raise ValueError(f"{meta_path}: no 'plot' text")
        genres = [g for g in meta.get("genres") or [] if isinstance(g, str)]
        image_path = os.path.join(self.src, "dataset", movie_id + ".jpeg")
        img = read_image_file(image_path)
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)  # a few posters are greyscale
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"{image_path}: expected an 8-bit RGB poster, got {img.dtype} {img.shape}")
        if self.options["image_size"]:
            img = square_resize(img, self.options["image_size"])
        labels = np.array([g in genres for g in GENRES], dtype=np.uint8)
        return {
            "rgb.png": img,
            "text.txt": max(plots, key=len),
            "labels.npy": labels,
            "json": {"id": movie_id, "title": meta.get("title"), "genres": genres},
        }


SOURCE_CLASS = MMIMDBSource


def _read_json(path: str) -> Any:
    """Parsed JSON; a ``ValueError`` naming the file when it is not valid JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
