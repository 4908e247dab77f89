"""Build small converter fixtures in the *exact* formats of the real datasets (synthetic content).

    python tests/data/make_fixtures.py OUT_DIR      # writes OUT_DIR/{nyudv2,nyudv2_v5,tokenfusion,...}

- ``nyudv2``: ``nyu_depth_v2_labeled.mat`` as MATLAB v7.3 — HDF5 with a 512-byte user block holding the
  MATLAB header, datasets stored with MATLAB's reversed axes (images (N,3,640,480) uint8, depths
  (N,640,480) float32 m, labels (N,640,480) uint16 0..894) and ``MATLAB_class`` attributes;
  ``splits.mat`` and ``classMapping40.mat`` as MATLAB v5 (1-based ``trainNdxs``/``testNdxs``; ``mapClass``
  (1,894), ``className`` (1,40), ``allClassName`` (1,894)).
- ``nyudv2_v5``: the same labeled file saved as MATLAB v5 (the converter must refuse it).
- ``tokenfusion``: ``rgb/``, ``masks/`` (0..39, 255), ``depth/`` (16-bit mm), TAB-separated train/val.txt.
- ``sunrgbd_list``: image/depth/label37 folders + space-separated train.txt/test.txt; depth in the
  toolbox encoding (mm rotated left by 3 bits), labels 0 = void, 1..37.
- ``sunrgbd_toolbox``: SUNRGBD scene folders, ``allsplit.mat`` (v5 cells of '/n/fs/sun3d/data/SUNRGBD/...'
  paths), ``SUNRGBDMeta.mat`` (v5 struct array with ``sequenceName``) and ``SUNRGBD2Dseg.mat`` (v7.3,
  ``SUNRGBD2Dseg/seglabel`` as an (N,1) array of HDF5 object references to (W,H) label arrays).
- ``taskonomy``: two buildings of ``{domain}/point_{P}_view_{V}_domain_{domain}.png`` (rgb 8-bit RGB,
  reshading 8-bit grey, edge_texture and depth_zbuffer 16-bit with 65535 = invalid) + train.txt/val.txt.
- ``mmimdb``: ``dataset/{id}.json`` + ``.jpeg`` posters of different sizes, ``split.json``.

Every builder returns the folder it wrote; :func:`build_all` returns ``{name: folder}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import scipy.io
from PIL import Image

NYU_N, NYU_TRAIN, NYU_TEST = 6, (1, 3, 4, 6), (2, 5)
NYU_W, NYU_H = 640, 480


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _jpeg(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="JPEG", quality=90)


def _matlab_v73(path: Path, datasets: dict[str, np.ndarray]) -> None:
    """Write an HDF5 file with MATLAB's 512-byte v7.3 header in the user block (as MATLAB does)."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, data in datasets.items():
            ds = f.create_dataset(name, data=data)
            matlab_class = {"float32": "single", "float64": "double"}.get(str(data.dtype), str(data.dtype))
            ds.attrs["MATLAB_class"] = np.bytes_(matlab_class)
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    header = text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as f:
        f.write(header.ljust(512, b"\x00"))


def nyu_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """The labeled-set arrays in h5py's (MATLAB-reversed) axis order."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:NYU_H, 0:NYU_W]
    images = np.empty((NYU_N, 3, NYU_W, NYU_H), np.uint8)
    depths = np.empty((NYU_N, NYU_W, NYU_H), np.float32)
    labels = np.empty((NYU_N, NYU_W, NYU_H), np.uint16)
    for i in range(NYU_N):
        rgb = np.stack([(xx + 40 * i) % 256, (yy + 10 * i) % 256, (xx + yy) % 256], -1).astype(np.uint8)
        images[i] = rgb.transpose(2, 1, 0)  # (H, W, 3) -> MATLAB-on-disk (3, W, H)
        depth = (0.5 + 9.0 * (xx / NYU_W) + 0.001 * i).astype(np.float32)
        depths[i] = depth.T
        lab = ((yy // 60) * 97 + (xx // 80) * 13 + i) % 895  # covers 0 (unlabeled) .. 894
        lab[:8, :8] = 0
        labels[i] = lab.astype(np.uint16).T
    images[0, :, 0, 0] = rng.integers(0, 256, 3)  # not a pure function of position
    return {"images": images, "depths": depths, "labels": labels}


def map_class_40() -> np.ndarray:
    """The synthetic 894 → 40 mapping written to classMapping40.mat (values 1..40, never 0)."""
    return (np.arange(894) * 7 % 40 + 1).astype(np.float64)


def _nyu_meta(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(
        root / "splits.mat",
        {"trainNdxs": np.array(NYU_TRAIN, float)[:, None], "testNdxs": np.array(NYU_TEST, float)[:, None]},
    )
    names = np.empty((1, 40), dtype=object)
    names[0, :] = [f"class{i:02d}" for i in range(40)]
    all_names = np.empty((1, 894), dtype=object)
    all_names[0, :] = [f"object{i:03d}" for i in range(894)]
    scipy.io.savemat(
        root / "classMapping40.mat",
        {"mapClass": map_class_40()[None, :], "className": names, "allClassName": all_names},
    )


def make_nyudv2(root: Path) -> Path:
    _nyu_meta(root)
    _matlab_v73(root / "nyu_depth_v2_labeled.mat", nyu_arrays())
    return root


def make_nyudv2_v5(root: Path) -> Path:
    _nyu_meta(root)
    scipy.io.savemat(root / "nyu_depth_v2_labeled.mat", {k: v[:2] for k, v in nyu_arrays().items()})
    return root


def make_tokenfusion(root: Path, n_train: int = 5, n_val: int = 3) -> Path:
    rng = np.random.default_rng(1)
    for split, ids in (("train", range(1, n_train + 1)), ("val", range(100, 100 + n_val))):
        lines = []
        for i in ids:
            rgb = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            mask = rng.integers(0, 40, (48, 64)).astype(np.uint8)
            mask[:4] = 255
            depth = rng.integers(500, 9000, (48, 64)).astype(np.uint16)
            _png(root / "rgb" / f"{i:06d}.png", rgb)
            _png(root / "masks" / f"{i:06d}.png", mask)
            _png(root / "depth" / f"{i:06d}.png", depth)
            lines.append(f"rgb/{i:06d}.png\tmasks/{i:06d}.png\tdepth/{i:06d}.png")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def sun_encode_depth(mm: np.ndarray) -> np.ndarray:
    """SUN RGB-D toolbox depth encoding: millimetres rotated left by 3 bits in 16 bits."""
    mm = mm.astype(np.uint16)
    return ((mm << 3) | (mm >> 13)).astype(np.uint16)


def _sun_sample(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mm = rng.integers(0, 8191, (h, w)).astype(np.uint16)  # up to 8.19 m: some beyond the 8 m clip
    mm[0, 0], mm[0, 1] = 0, 8190
    label = rng.integers(0, 38, (h, w)).astype(np.uint8)
    label[1, :] = 0
    return rgb, mm, label


def make_sunrgbd_list(root: Path, n_train: int = 4, n_test: int = 3) -> Path:
    rng = np.random.default_rng(2)
    for split, n in (("train", n_train), ("test", n_test)):
        lines = []
        for i in range(1, n + 1):
            h, w = (42, 56) if i % 2 else (48, 64)  # sensors differ in resolution
            rgb, mm, label = _sun_sample(rng, h, w)
            _jpeg(root / "image" / split / f"img-{i:06d}.jpg", rgb)
            _png(root / "depth" / split / f"{i:08d}.png", sun_encode_depth(mm))
            _png(root / "label37" / split / f"img-{i:06d}.png", label)
            lines.append(f"image/{split}/img-{i:06d}.jpg depth/{split}/{i:08d}.png label37/{split}/img-{i:06d}.png")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


SUN_SCENES = (
    "kv1/NYUdata/NYU0001",
    "kv1/NYUdata/NYU0002",
    "kv2/kinect2data/000002_2014-05-26_14-23-37",
    "realsense/lg/2014_10_24-13_27_42-1",
    "xtion/xtion_align_data/2014_01_25-10_43_32-7",
)
SUN_TRAIN = (1, 3, 4)  # 1-based indices into SUNRGBDMeta
SUN_TEST = (2, 5)


def make_sunrgbd_toolbox(root: Path) -> Path:
    rng = np.random.default_rng(3)
    labels = []
    meta = np.zeros((1, len(SUN_SCENES)), dtype=[("sequenceName", "O"), ("rgbname", "O")])
    for i, scene in enumerate(SUN_SCENES):
        h, w = 40 + 2 * i, 52 + 2 * i
        rgb, mm, label = _sun_sample(rng, h, w)
        name = scene.rsplit("/", 1)[-1]
        _jpeg(root / "SUNRGBD" / scene / "image" / f"{name}.jpg", rgb)
        _png(root / "SUNRGBD" / scene / "depth" / f"{name}.png", sun_encode_depth(mm))
        labels.append(label)
        meta[0, i] = (f"SUNRGBD/{scene}", f"{name}.jpg")
    tools = root / "SUNRGBDtoolbox"
    (tools / "traintestSUNRGBD").mkdir(parents=True)
    (tools / "Metadata").mkdir(parents=True)

    def cells(indices: tuple[int, ...]) -> np.ndarray:
        c = np.empty((1, len(indices)), dtype=object)
        c[0, :] = [f"/n/fs/sun3d/data/SUNRGBD/{SUN_SCENES[i - 1]}/" for i in indices]
        return c

    scipy.io.savemat(
        tools / "traintestSUNRGBD" / "allsplit.mat", {"alltrain": cells(SUN_TRAIN), "alltest": cells(SUN_TEST)}
    )
    scipy.io.savemat(tools / "Metadata" / "SUNRGBDMeta.mat", {"SUNRGBDMeta": meta})
    seg = tools / "Metadata" / "SUNRGBD2Dseg.mat"
    with h5py.File(seg, "w", userblock_size=512) as f:
        refs_group = f.create_group("#refs#")
        group = f.create_group("SUNRGBD2Dseg")
        refs = group.create_dataset("seglabel", (len(labels), 1), dtype=h5py.ref_dtype)
        for i, label in enumerate(labels):
            ds = refs_group.create_dataset(f"l{i}", data=label.astype(np.float64).T)  # MATLAB double, (W, H)
            refs[i, 0] = ds.ref
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(seg, "r+b") as f:
        f.write((header.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM").ljust(512, b"\x00"))
    return root


TASKONOMY_BUILDINGS = {"allensville": [(0, 0), (0, 1), (3, 2), (12, 0)], "beechwood": [(1, 0), (7, 5)]}


def make_taskonomy(root: Path) -> Path:
    rng = np.random.default_rng(4)
    for building, samples in TASKONOMY_BUILDINGS.items():
        for p, v in samples:
            arrays = {
                "rgb": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                "reshading": rng.integers(0, 256, (32, 32), dtype=np.uint8),
                "edge_texture": rng.integers(0, 65535, (32, 32)).astype(np.uint16),
                "depth_zbuffer": rng.integers(256, 8192, (32, 32)).astype(np.uint16),
            }
            arrays["depth_zbuffer"][:2] = 65535  # Taskonomy's invalid depth
            for domain, a in arrays.items():
                _png(root / building / domain / f"point_{p}_view_{v}_domain_{domain}.png", a)
    (root / "train.txt").write_text("allensville\n")
    (root / "val.txt").write_text("beechwood/point_1_view_0\nbeechwood/point_7_view_5\n")
    return root


MMIMDB_SPLIT = {
    "train": ["0000008", "0000010", "0000012", "0000014"],
    "dev": ["0000020"],
    "test": ["0000030", "0000031"],
}


def make_mmimdb(root: Path) -> Path:
    rng = np.random.default_rng(5)
    genres_cycle = [["Drama", "Romance"], ["Comedy"], ["Sci-Fi", "Reality-TV", "Action"], ["Film-Noir", "Crime"]]
    ids = [i for ids in MMIMDB_SPLIT.values() for i in ids]
    for n, movie_id in enumerate(ids):
        h, w = 40 + 3 * n, 27 + 2 * n  # posters come in different sizes
        _jpeg(root / "dataset" / f"{movie_id}.jpeg", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        meta = {
            "title": f"Movie {movie_id}",
            "genres": genres_cycle[n % len(genres_cycle)],
            "plot": [f"short plot {n}.", f"a much longer plot summary number {n} that wins.", "mid plot."],
        }
        (root / "dataset" / f"{movie_id}.json").write_text(json.dumps(meta))
    (root / "split.json").write_text(json.dumps(MMIMDB_SPLIT))
    return root


BUILDERS = {
    "nyudv2": make_nyudv2,
    "nyudv2_v5": make_nyudv2_v5,
    "tokenfusion": make_tokenfusion,
    "sunrgbd_list": make_sunrgbd_list,
    "sunrgbd_toolbox": make_sunrgbd_toolbox,
    "taskonomy": make_taskonomy,
    "mmimdb": make_mmimdb,
}


def build_all(out: Path) -> dict[str, Path]:
    return {name: build(Path(out) / name) for name, build in BUILDERS.items()}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for name, path in build_all(Path(sys.argv[1])).items():
        print(f"{name}: {path}")
