"""NYU Depth v2 (labeled subset) → ``rgb.png``, ``depth.png`` (uint16 mm), ``label.png`` (40 classes, 255 = void).

Two layouts under ``--src``, detected in this order:

1. **Official**: ``nyu_depth_v2_labeled.mat`` (MATLAB v7.3, i.e. HDF5 behind a 512-byte MATLAB header;
   h5py sees MATLAB's column-major axes reversed: ``images`` (N, 3, 640, 480) uint8, ``depths``
   (N, 640, 480) float32 metres, ``labels`` (N, 640, 480) uint16 with 0 = unlabeled and 1..894 = class),
   ``classMapping40.mat`` (MATLAB v5: ``mapClass`` (1, 894) → 1..40, ``className`` (1, 40)) and
   ``splits.mat`` (``trainNdxs`` / ``testNdxs``, 1-based; 795 / 654). Keys are ``nyu-<index:04d>`` with
   the 1-based image index.
2. **TokenFusion** (the CEN / light-weight-RefineNet release): ``train.txt`` / ``val.txt`` with TAB-separated
   ``rgb/000003.png<TAB>masks/000003.png<TAB>depth/000003.png`` lines; masks are already 40-class (0..39,
   255 = void), depth must be 16-bit PNG in millimetres (an 8-bit depth cannot be made metric and is an
   error). The official test split is called ``val`` there; ``--split test`` reads ``val.txt``. Keys are
   ``nyu-<file stem>``.

Writes (H, W) = (480, 640) for the official layout; depth = round(metres·1000), 0 stays 0 (invalid).
"""

from __future__ import annotations

import os
from typing import Any

import h5py
import numpy as np

from ..codecs import read_image_file
from ..manifest import ModalitySpec
from . import Source

LABELED = "nyu_depth_v2_labeled.mat"
SPLITS = "splits.mat"
MAPPING = "classMapping40.mat"
NUM_SOURCE_CLASSES = 894

NYU40_CLASSES = (
    "wall",
    "floor",
    "cabinet",
    "bed",
    "chair",
    "sofa",
    "table",
    "door",
    "window",
    "bookshelf",
    "picture",
    "counter",
    "blinds",
    "desk",
    "shelves",
    "curtain",
    "dresser",
    "pillow",
    "mirror",
    "floor mat",
    "clothes",
    "ceiling",
    "books",
    "refridgerator",
    "television",
    "paper",
    "towel",
    "shower curtain",
    "box",
    "whiteboard",
    "person",
    "night stand",
    "toilet",
    "sink",
    "lamp",
    "bathtub",
    "bag",
    "otherstructure",
    "otherfurniture",
    "otherprop",
)


def mat_version(path: str) -> str:
    """The MATLAB version a .mat file declares in its 128-byte header (e.g. ``"7.3"``, ``"5.0"``)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(128)
    if not head.startswith(b"MATLAB "):
        raise ValueError(f"{path}: not a MATLAB .mat file (no 'MATLAB x.y MAT-file' header)")
    return head[7:].split(b" ", 1)[0].decode("ascii", "replace")


def load_v5_mat(path: str) -> dict[str, Any]:
    """Variables of a MATLAB v5 .mat (scipy); ``FileNotFoundError``/``ValueError`` naming the file."""
    import scipy.io  # heavy: scipy (~0.3 s), only for v5 .mat files

    version = mat_version(path)
    if version.startswith("7.3"):
        raise ValueError(f"{path}: MATLAB v7.3 (HDF5) file where a v5 .mat was expected")
    try:
        return scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises several unrelated types for corrupt files
        raise ValueError(f"{path}: unreadable MATLAB v{version} file ({exc})") from exc


def class_map_40(path: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """(lookup table (895,) uint8: NYU 894-class label (0 = unlabeled) → 0..39, void → 255; the 40 names)."""
    mat = load_v5_mat(path)
    if "mapClass" not in mat:
        raise ValueError(f"{path}: no 'mapClass' variable (expected the 894 → 40 class mapping)")
    mapping = np.asarray(mat["mapClass"]).reshape(-1).astype(np.int64)
    if mapping.size != NUM_SOURCE_CLASSES or mapping.min() < 0 or mapping.max() > 40:
        raise ValueError(
            f"{path}: mapClass must hold {NUM_SOURCE_CLASSES} values in 0..40, got {mapping.size} "
            f"in {mapping.min()}..{mapping.max()}"
        )
    lut = np.full(NUM_SOURCE_CLASSES + 1, 255, dtype=np.uint8)
    lut[1:] = np.where(mapping > 0, mapping - 1, 255)
    names = NYU40_CLASSES
    if "className" in mat and np.asarray(mat["className"]).size == len(NYU40_CLASSES):
        names = tuple(str(np.asarray(c).reshape(-1)[0]) for c in np.asarray(mat["className"]).reshape(-1))
    return lut, names


class NYUDv2Source(Source):
    name = "nyudv2"

    def __init__(self, src: str | None, **options: Any) -> None:
        super().__init__(src, **options)
        if not src or not os.path.isdir(src):
            raise FileNotFoundError(f"nyudv2: --src {src!r} is not a directory")
        self._h5: Any = None
        self._tokenfusion = not os.path.exists(os.path.join(src, LABELED)) and (
            os.path.exists(os.path.join(src, "train.txt")) or os.path.exists(os.path.join(src, "val.txt"))
        )
        self._classes = NYU40_CLASSES
        if self._tokenfusion:
            self._lists = {split: self._read_list(split) for split in self.splits}
            return
        labeled = os.path.join(src, LABELED)
        version = mat_version(labeled)
        if version != "7.3":
            raise ValueError(f"{labeled}: MATLAB v{version} MAT-file, expected v7.3 (HDF5, as distributed by NYU)")
        self._lut, self._classes = class_map_40(os.path.join(src, MAPPING))
        splits = load_v5_mat(os.path.join(src, SPLITS))
        self._indices: dict[str, list[int]] = {}
        for split, var in (("train", "trainNdxs"), ("test", "testNdxs")):
            if var not in splits:
                raise ValueError(f"{os.path.join(src, SPLITS)}: no '{var}' variable")
            self._indices[split] = sorted(int(i) for i in np.asarray(splits[var]).reshape(-1))
        n = self._check_labeled(labeled)
        bad = [i for ix in self._indices.values() for i in ix if not 1 <= i <= n]
        if bad:
            raise ValueError(f"{os.path.join(src, SPLITS)}: 1-based indices {bad[:5]} outside 1..{n}")

    # -- official layout ---------------------------------------------------------------------------------
    def _check_labeled(self, path: str) -> int:
        with h5py.File(path, "r") as f:
            for name in ("images", "depths", "labels"):
                if name not in f:
                    raise ValueError(f"{path}: no '{name}' dataset")
            img, dep, lab = f["images"].shape, f["depths"].shape, f["labels"].shape
        if len(img) != 4 or img[1] != 3 or dep != (img[0], img[2], img[3]) or lab != dep:
            raise ValueError(
                f"{path}: shapes disagree between modalities: images {img}, depths {dep}, labels {lab} "
                "(expected (N,3,W,H), (N,W,H), (N,W,H))"
            )
        return img[0]

    def _file(self) -> Any:
        if self._h5 is None:  # opened on first load, i.e. inside the worker process that uses it
            self._h5 = h5py.File(os.path.join(self.src, LABELED), "r")
        return self._h5

    # -- TokenFusion layout ------------------------------------------------------------------------------
    def _read_list(self, split: str) -> dict[str, tuple[str, str, str]]:
        path = os.path.join(self.src, "val.txt" if split == "test" else "train.txt")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file (TokenFusion layout split list)")
        entries: dict[str, tuple[str, str, str]] = {}
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 3:
                    raise ValueError(
                        f"{path}:{lineno}: expected 3 TAB-separated paths (rgb, mask, depth), got {len(parts)}"
                    )
                stem = os.path.splitext(os.path.basename(parts[0]))[0].replace(".", "_")
                entries[f"nyu-{stem}"] = tuple(os.path.join(self.src, p) for p in parts)  # type: ignore[misc]
        return entries

    # -- Source API --------------------------------------------------------------------------------------
    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", "test")

    def modalities(self, split: str) -> dict[str, ModalitySpec]:
        self.check_split(split)
        hw: tuple[int | None, int | None] = (None, None) if self._tokenfusion else (480, 640)
        return {
            "rgb.png": ModalitySpec("uint8", "image", (*hw, 3), "8-bit sRGB"),
            "depth.png": ModalitySpec("uint16", "depth", hw, "1 mm, 0 = invalid"),
            "label.png": ModalitySpec("uint8", "label", hw, "NYU 40-class index", self._classes, 255),
        }

    def keys(self, split: str) -> list[str]:
        self.check_split(split)
        if self._tokenfusion:
            return sorted(self._lists[split])
        return [f"nyu-{i:04d}" for i in self._indices[split]]

    def where(self, split: str, key: str) -> str:
        if self._tokenfusion:
            return " + ".join(self._lists[split][key])
        return f"{os.path.join(self.src, LABELED)}[{key.split('-')[1]}]"

    def load(self, split: str, key: str) -> dict[str, Any]:
        if self._tokenfusion:
            rgb_path, mask_path, depth_path = self._lists[split][key]
            rgb, mask, depth = read_image_file(rgb_path), read_image_file(mask_path), read_image_file(depth_path)
            if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
                raise ValueError(f"{rgb_path}: expected an 8-bit RGB image, got {rgb.dtype} {rgb.shape}")
            if mask.ndim != 2 or mask.dtype != np.uint8:
                raise ValueError(f"{mask_path}: expected a single-channel 8-bit mask, got {mask.dtype} {mask.shape}")
            if depth.ndim != 2 or depth.dtype != np.uint16:
                raise ValueError(f"{depth_path}: expected a 16-bit depth PNG in mm, got {depth.dtype} {depth.shape}")
            bad = (mask < 255) & (mask >= len(NYU40_CLASSES))
            if bad.any():
                raise ValueError(f"{mask_path}: label values {sorted(set(mask[bad].tolist()))[:5]} outside 0..39/255")
            return {"rgb.png": rgb, "depth.png": depth, "label.png": mask}
        i = int(key.split("-")[1]) - 1
        f = self._file()
        rgb = np.ascontiguousarray(f["images"][i].transpose(2, 1, 0))  # (3, W, H) → (H, W, 3)
        depth_m = f["depths"][i].T
        raw = f["labels"][i].T
        if raw.max(initial=0) > NUM_SOURCE_CLASSES:
            raise ValueError(f"{self.where(split, key)}: label values above {NUM_SOURCE_CLASSES}")
        if not np.isfinite(depth_m).all() or depth_m.min(initial=0) < 0:
            raise ValueError(f"{self.where(split, key)}: depth has negative or non-finite values")
        depth = np.clip(np.round(depth_m.astype(np.float64) * 1000.0), 0, 65535).astype(np.uint16)
        return {"rgb.png": rgb, "depth.png": depth, "label.png": self._lut[raw]}

    def config(self) -> dict[str, Any]:
        return {"source": self.name, "layout": "tokenfusion" if self._tokenfusion else "official", **self.options}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_h5": None}  # an open HDF5 handle never crosses a process boundary


SOURCE_CLASS = NYUDv2Source
