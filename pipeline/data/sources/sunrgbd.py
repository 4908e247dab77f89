"""SUN RGB-D → ``rgb.png``, ``depth.png`` (uint16 mm, ≤ 8000), ``label.png`` (37 classes, 255 = void).

Depth PNGs store the SUN RGB-D toolbox encoding: millimetres rotated left by 3 bits in 16 bits. As in the
toolbox's ``read3dPoints.m`` (``bitor(bitshift(d,-3), bitshift(d,16-3))``) we rotate back — which is
``raw >> 3`` for every real pixel, whose low 3 bits are 0 — and clip at 8 m; 0 stays 0 (invalid).
Labels: 0 = void → 255, 1..37 → 0..36 (the ``seg37list`` order). Image sizes differ between sensors, so
the manifest declares (H, W) as variable.

Two layouts under ``--src``, detected in this order:

1. **List layout** (Ankur Handa's sunrgbd-meta-data release and its reorganisations): ``train.txt`` /
   ``test.txt`` (or ``train37.txt`` / ``test37.txt``), one sample per line as three whitespace-separated
   paths relative to ``--src``: ``image/train/img-000001.jpg depth/train/00000001.png
   label37/train/img-000001.png``. Keys: ``sun-<split>-<image stem>``.
2. **Toolbox layout** (the official release): ``SUNRGBDtoolbox/traintestSUNRGBD/allsplit.mat``
   (``alltrain`` / ``alltest``: scene folder paths, 5,285 / 5,050), ``SUNRGBDtoolbox/Metadata/SUNRGBDMeta.mat``
   (``SUNRGBDMeta(i).sequenceName`` names the scene folder of image i) and
   ``SUNRGBDtoolbox/Metadata/SUNRGBD2Dseg.mat`` (MATLAB v7.3; ``SUNRGBD2Dseg(i).seglabel`` is image i's
   37-class label, read lazily per image through HDF5 references — the file is far too big to load whole).
   Scene folders ``SUNRGBD/<...>/`` hold ``image/<name>.jpg`` and ``depth/<name>.png``
   (``--depth-dir depth_bfx`` for the toolbox's filled depth). Keys: ``sun-<i:05d>`` (1-based image index).
"""

from __future__ import annotations

import glob
import os
from typing import Any

import h5py
import numpy as np

from ..codecs import read_image_file
from ..manifest import ModalitySpec
from . import Source
from .nyudv2 import load_v5_mat, mat_version

SUN37_CLASSES = (
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
    "floor_mat",
    "clothes",
    "ceiling",
    "books",
    "fridge",
    "tv",
    "paper",
    "towel",
    "shower_curtain",
    "box",
    "whiteboard",
    "person",
    "night_stand",
    "toilet",
    "sink",
    "lamp",
    "bathtub",
    "bag",
)
MAX_DEPTH_MM = 8000
ALLSPLIT = os.path.join("SUNRGBDtoolbox", "traintestSUNRGBD", "allsplit.mat")
META = os.path.join("SUNRGBDtoolbox", "Metadata", "SUNRGBDMeta.mat")
SEG = os.path.join("SUNRGBDtoolbox", "Metadata", "SUNRGBD2Dseg.mat")


def decode_sun_depth(raw: np.ndarray, where: str) -> np.ndarray:
    """Toolbox-encoded uint16 depth → uint16 millimetres clipped at 8 m (0 = invalid)."""
    if raw.dtype != np.uint16 or raw.ndim != 2:
        raise ValueError(f"{where}: expected a 16-bit single-channel depth PNG, got {raw.dtype} {raw.shape}")
    mm = (raw >> 3) | (raw << 13)  # 16-bit rotate right by 3 (uint16 arithmetic wraps)
    return np.minimum(mm, MAX_DEPTH_MM).astype(np.uint16)


def map_sun_labels(raw: np.ndarray, where: str) -> np.ndarray:
    """37-class labels with 0 = void → uint8 0..36, void → 255."""
    if raw.ndim != 2:
        raise ValueError(f"{where}: expected a single-channel label image, got shape {raw.shape}")
    if raw.max(initial=0) > len(SUN37_CLASSES):
        raise ValueError(f"{where}: label values up to {raw.max()} exceed the {len(SUN37_CLASSES)} classes")
    raw = raw.astype(np.int64)
    return np.where(raw == 0, 255, raw - 1).astype(np.uint8)


def _scene_path(path: str) -> str:
    """Normalise a toolbox scene path ('/n/fs/sun3d/data/SUNRGBD/kv1/NYUdata/NYU0001/') to 'SUNRGBD/kv1/...'."""
    path = path.strip().replace("\\", "/").rstrip("/")
    at = path.find("SUNRGBD/")
    return path[at:] if at >= 0 else path


def _cell_strings(value: Any) -> list[str]:
    return [str(np.asarray(v).reshape(-1)[0]) for v in np.asarray(value, dtype=object).reshape(-1)]


class SUNRGBDSource(Source):
    name = "sunrgbd"
    OPTIONS = {"depth_dir": (str, "depth", "toolbox layout: scene sub-folder holding the depth PNG")}

    def __init__(self, src: str | None, **options: Any) -> None:
        super().__init__(src, **options)
        if not src or not os.path.isdir(src):
            raise FileNotFoundError(f"sunrgbd: --src {src!r} is not a directory")
        self._h5: Any = None
        self._lists: dict[str, dict[str, tuple[str, str, str]]] = {}
        self._layout = (
            "list"
            if any(os.path.exists(os.path.join(src, f"{s}{n}.txt")) for s in self.splits for n in ("", "37"))
            else "toolbox"
        )
        if self._layout == "list":
            self._lists = {split: self._read_list(split) for split in self.splits}
        else:
            self._init_toolbox()

    # -- list layout -------------------------------------------------------------------------------------
    def _read_list(self, split: str) -> dict[str, tuple[str, str, str]]:
        candidates = [os.path.join(self.src, f"{split}{n}.txt") for n in ("", "37")]
        path = next((p for p in candidates if os.path.exists(p)), None)
        if path is None:
            raise FileNotFoundError(f"{candidates[0]}: no such file (SUN RGB-D split list)")
        entries: dict[str, tuple[str, str, str]] = {}
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 3:
                    raise ValueError(f"{path}:{lineno}: expected 3 paths (image depth label), got {len(parts)}")
                stem = os.path.splitext(os.path.basename(parts[0]))[0].replace(".", "_")
                entries[f"sun-{split}-{stem}"] = tuple(os.path.join(self.src, p) for p in parts)  # type: ignore[misc]
        return entries

    # -- toolbox layout ----------------------------------------------------------------------------------
    def _init_toolbox(self) -> None:
        allsplit, meta, seg = (os.path.join(self.src, p) for p in (ALLSPLIT, META, SEG))
        if not os.path.exists(allsplit):
            raise FileNotFoundError(f"sunrgbd: neither train.txt/test.txt nor {allsplit} under {self.src}")
        split_mat = load_v5_mat(allsplit)
        meta_mat = load_v5_mat(meta)
        if mat_version(seg) != "7.3":
            raise ValueError(f"{seg}: MATLAB v{mat_version(seg)} MAT-file, expected v7.3 (HDF5)")
        if "SUNRGBDMeta" not in meta_mat:
            raise ValueError(f"{meta}: no 'SUNRGBDMeta' variable")
        records = np.asarray(meta_mat["SUNRGBDMeta"]).reshape(-1)
        if "sequenceName" not in (records.dtype.names or ()):
            raise ValueError(f"{meta}: SUNRGBDMeta has no 'sequenceName' field")
        index = {_scene_path(str(np.asarray(r["sequenceName"]).reshape(-1)[0])): i + 1 for i, r in enumerate(records)}
        self._scenes: dict[int, str] = {i: p for p, i in index.items()}
        self._indices: dict[str, list[int]] = {}
        for split, var in (("train", "alltrain"), ("test", "alltest")):
            if var not in split_mat:
                raise ValueError(f"{allsplit}: no '{var}' variable")
            scenes = [_scene_path(p) for p in _cell_strings(split_mat[var])]
            unknown = [p for p in scenes if p not in index]
            if unknown:
                raise ValueError(f"{allsplit}: {var} names scenes missing from {meta}, e.g. {unknown[0]}")
            self._indices[split] = sorted(index[p] for p in scenes)
        with h5py.File(seg, "r") as f:
            if "SUNRGBD2Dseg" not in f or "seglabel" not in f["SUNRGBD2Dseg"]:
                raise ValueError(f"{seg}: no SUNRGBD2Dseg.seglabel")
            if f["SUNRGBD2Dseg"]["seglabel"].size != len(records):
                raise ValueError(
                    f"{seg}: {f['SUNRGBD2Dseg']['seglabel'].size} labels for {len(records)} images in {meta}"
                )

    def _scene_file(self, scene: str, folder: str, pattern: str) -> str:
        found = sorted(glob.glob(os.path.join(self.src, scene, folder, pattern)))
        if len(found) != 1:
            raise FileNotFoundError(
                f"{os.path.join(self.src, scene, folder)}: expected one {pattern} file, found {len(found)}"
            )
        return found[0]

    def _label_from_seg(self, i: int) -> np.ndarray:
        if self._h5 is None:  # opened lazily inside the process that reads it
            self._h5 = h5py.File(os.path.join(self.src, SEG), "r")
            self._seg_refs = self._h5["SUNRGBD2Dseg"]["seglabel"][()].reshape(-1)
        return np.asarray(self._h5[self._seg_refs[i - 1]]).T  # MATLAB column-major: h5py sees (W, H)

    # -- Source API --------------------------------------------------------------------------------------
    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", "test")

    def modalities(self, split: str) -> dict[str, ModalitySpec]:
        self.check_split(split)
        return {
            "rgb.png": ModalitySpec("uint8", "image", (None, None, 3), "8-bit sRGB"),
            "depth.png": ModalitySpec("uint16", "depth", (None, None), f"1 mm, 0 = invalid, clipped at {MAX_DEPTH_MM}"),
            "label.png": ModalitySpec("uint8", "label", (None, None), "SUN RGB-D 37-class index", SUN37_CLASSES, 255),
        }

    def keys(self, split: str) -> list[str]:
        self.check_split(split)
        if self._layout == "list":
            return sorted(self._lists[split])
        return [f"sun-{i:05d}" for i in self._indices[split]]

    def where(self, split: str, key: str) -> str:
        if self._layout == "list":
            return " + ".join(self._lists[split][key])
        return os.path.join(self.src, self._scenes[int(key.split("-")[1])])

    def load(self, split: str, key: str) -> dict[str, Any]:
        if self._layout == "list":
            rgb_path, depth_path, label_path = self._lists[split][key]
            rgb, raw_depth, raw_label = (read_image_file(p) for p in (rgb_path, depth_path, label_path))
            label_where = label_path
        else:
            i = int(key.split("-")[1])
            scene = self._scenes[i]
            rgb_path = self._scene_file(scene, "image", "*.jpg")
            depth_path = self._scene_file(scene, self.options["depth_dir"], "*.png")
            rgb, raw_depth = read_image_file(rgb_path), read_image_file(depth_path)
            raw_label, label_where = self._label_from_seg(i), f"{os.path.join(self.src, SEG)}[{i}]"
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"{rgb_path}: expected an RGB image, got shape {rgb.shape}")
        return {
            "rgb.png": rgb,
            "depth.png": decode_sun_depth(raw_depth, depth_path),
            "label.png": map_sun_labels(raw_label, label_where),
        }

    def config(self) -> dict[str, Any]:
        return {"source": self.name, "layout": self._layout, **self.options}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_h5": None, "_seg_refs": None}


SOURCE_CLASS = SUNRGBDSource
