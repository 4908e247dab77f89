"""Every source, on fixtures in the real formats, through shards and back out of the loader.

Checks per source: split sizes, keys, decoded dtypes and layouts (uint16 depth stays uint16), the unit
conversions (NYU metres → mm, SUN toolbox bit rotation and 8 m clip) and the label mappings.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import load_manifest

from . import make_fixtures as fx
from .util import read_all, shard


def _by_key(samples):
    return {s["__key__"][0]: s for s in samples}


# -- embedded -------------------------------------------------------------------------------------------


def test_embedded_stereo_depth_from_disparity_and_disjoint_regions(tmp_path):
    from skimage.data import stereo_motorcycle

    m_train = shard(
        "embedded", "stereo", tmp_path, "train", options={"patch": 16, "downscale": 4}, samples_per_shard=64
    )
    m_val = shard("embedded", "stereo", tmp_path, "val", options={"patch": 32})
    assert m_train.total_samples == 224 and m_val.total_samples == 60
    train_x = [s["json"][0]["x"] for s in read_all(m_train)]
    width4 = 741 // 4
    assert max(train_x) + 16 <= int(0.75 * width4), "train patches stay in the left 3/4"

    val = read_all(m_val)
    assert min(s["json"][0]["x"] for s in val) >= int(0.75 * 741) + 32, "val starts one patch after the cut"
    sample = val[0]
    assert sample["rgb.png"].dtype == torch.uint8 and sample["rgb.png"].shape == (1, 3, 32, 32)
    assert sample["right.png"].shape == (1, 3, 32, 32)
    assert sample["depth.png"].dtype == torch.uint16 and sample["depth.png"].shape == (1, 1, 32, 32)
    left, right, disparity = stereo_motorcycle()
    y, x = sample["json"][0]["y"], sample["json"][0]["x"]
    d = disparity[y : y + 32, x : x + 32].astype(np.float64)
    expected = np.where(np.isfinite(d), np.round(994.978 * 193.001 / (np.where(np.isfinite(d), d, 0) + 31.086)), 0)
    assert np.array_equal(sample["depth.png"][0, 0].numpy().astype(np.float64), expected)
    assert np.array_equal(sample["right.png"][0].permute(1, 2, 0).numpy(), right[y : y + 32, x : x + 32])


def test_embedded_scenes_have_exact_labels_and_depth(tmp_path):
    m = shard("embedded", "scenes", tmp_path, "val", options={"scenes": 6, "size": 32})
    assert m.total_samples == 6
    assert m.modalities["label.png"].classes == ("floor", "low_box", "tall_box", "cylinder", "sphere", "duck")
    samples = read_all(m)
    seen = set()
    for s in samples:
        label, depth = s["label.png"][0], s["depth.png"][0, 0]
        assert label.dtype == torch.int64 and depth.dtype == torch.uint16
        depth = depth.to(torch.int32)  # torch implements few ops on uint16
        values = set(label.unique().tolist())
        assert values <= {0, 1, 2, 3, 4, 5, 255}
        seen |= values
        assert (depth[label == 255] == 0).all() and (depth[label != 255] > 0).all()
    assert len(seen - {0, 255}) >= 3, "several object classes are rendered"
    again = read_all(shard("embedded", "scenes", tmp_path / "again", "val", options={"scenes": 6, "size": 32}))
    assert all(torch.equal(a["rgb.png"], b["rgb.png"]) for a, b in zip(samples, again)), "seeded rendering"


# -- NYUDv2 ---------------------------------------------------------------------------------------------


def test_nyudv2_official_layout(raw_datasets, tmp_path):
    src = raw_datasets["nyudv2"]
    m_train = shard("nyudv2", src, tmp_path, "train", samples_per_shard=2)
    m_test = shard("nyudv2", src, tmp_path, "test")
    assert (m_train.total_samples, m_test.total_samples) == (len(fx.NYU_TRAIN), len(fx.NYU_TEST))
    assert m_train.modalities["label.png"].classes == tuple(f"class{i:02d}" for i in range(40))
    raw = fx.nyu_arrays()
    lut = np.concatenate([[255], fx.map_class_40() - 1]).astype(np.int64)
    samples = _by_key(read_all(m_train))
    assert sorted(samples) == [f"nyu-{i:04d}" for i in fx.NYU_TRAIN]
    for i in fx.NYU_TRAIN:
        s = samples[f"nyu-{i:04d}"]
        assert s["rgb.png"].shape == (1, 3, 480, 640) and s["rgb.png"].dtype == torch.uint8
        assert np.array_equal(s["rgb.png"][0].numpy(), raw["images"][i - 1].transpose(0, 2, 1))
        assert s["depth.png"].dtype == torch.uint16 and s["depth.png"].shape == (1, 1, 480, 640)
        mm = np.round(raw["depths"][i - 1].T.astype(np.float64) * 1000)
        assert np.array_equal(s["depth.png"][0, 0].numpy(), mm.astype(np.uint16))
        assert s["label.png"].dtype == torch.int64
        assert np.array_equal(s["label.png"][0].numpy(), lut[raw["labels"][i - 1].T])
        assert (s["label.png"][0, :8, :8] == 255).all(), "unlabeled (0) becomes ignore"


def test_nyudv2_refuses_wrong_mat_version_and_bad_files(raw_datasets, tmp_path):
    with pytest.raises(ValueError, match=r"nyu_depth_v2_labeled\.mat: MATLAB v5\.0 MAT-file, expected v7\.3"):
        shard("nyudv2", raw_datasets["nyudv2_v5"], tmp_path, "train")
    broken = tmp_path / "broken"
    fx._nyu_meta(broken)
    fx._matlab_v73(
        broken / "nyu_depth_v2_labeled.mat",
        {
            "images": np.zeros((6, 3, 8, 6), np.uint8),
            "depths": np.zeros((6, 8, 6), np.float32),
            "labels": np.zeros((6, 8, 5), np.uint16),
        },
    )
    with pytest.raises(ValueError, match=r"nyu_depth_v2_labeled\.mat: shapes disagree between modalities"):
        shard("nyudv2", broken, tmp_path / "out", "train")
    (broken / "splits.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"splits\.mat"):
        shard("nyudv2", broken, tmp_path / "out", "train")


def test_nyudv2_tokenfusion_layout_and_skip_bad(raw_datasets, tmp_path):
    src = tmp_path / "tf"
    shutil.copytree(raw_datasets["tokenfusion"], src)
    m = shard("nyudv2", src, tmp_path / "a", "test")  # the official test split is TokenFusion's val.txt
    assert m.total_samples == 3
    s = read_all(m)[0]
    mask = np.asarray(Image.open(src / "masks" / "000100.png"))
    assert np.array_equal(s["label.png"][0].numpy(), mask.astype(np.int64))
    depth = np.asarray(Image.open(src / "depth" / "000100.png"))
    assert s["depth.png"].dtype == torch.uint16 and np.array_equal(s["depth.png"][0, 0].numpy(), depth)

    Image.fromarray(np.zeros((48, 64), np.uint8)).save(src / "depth" / "000002.png")  # 8-bit depth
    (src / "rgb" / "000003.png").write_bytes(b"not a png")  # unreadable image
    (src / "masks" / "000004.png").unlink()  # missing file
    Image.fromarray(np.zeros((40, 64), np.uint8)).save(src / "masks" / "000005.png")  # shape disagrees
    with pytest.raises(ValueError, match=r"depth/000002\.png: expected a 16-bit depth PNG"):
        shard("nyudv2", src, tmp_path / "b", "train")
    m = shard("nyudv2", src, tmp_path / "c", "train", skip_bad=True)
    assert m.total_samples == 1 and m.skipped_samples == 4
    reasons = {s["key"]: s["error"] for s in m.skipped}
    assert "16-bit" in reasons["nyu-000002"] and "000003.png: unreadable image" in reasons["nyu-000003"]
    assert "000004.png: no such file" in reasons["nyu-000004"]
    assert "shapes disagree" in reasons["nyu-000005"]
    assert load_manifest(m.location).skipped_samples == 4


# -- SUN RGB-D ------------------------------------------------------------------------------------------


def _sun_expected_depth(path: Path) -> np.ndarray:
    raw = np.asarray(Image.open(path)).astype(np.int64)
    return np.minimum(raw >> 3, 8000)


def test_sunrgbd_list_layout(raw_datasets, tmp_path):
    src = raw_datasets["sunrgbd_list"]
    m = shard("sunrgbd", src, tmp_path, "train")
    assert m.total_samples == 4 and shard("sunrgbd", src, tmp_path, "test").total_samples == 3
    samples = _by_key(read_all(m))
    s = samples["sun-train-img-000001"]
    depth = s["depth.png"][0, 0].numpy()
    assert s["depth.png"].dtype == torch.uint16
    assert np.array_equal(depth, _sun_expected_depth(src / "depth/train/00000001.png"))
    assert depth.max() == 8000 and depth[0, 0] == 0, "clipped at 8 m; 0 stays invalid"
    label = np.asarray(Image.open(src / "label37/train/img-000001.png")).astype(np.int64)
    assert np.array_equal(s["label.png"][0].numpy(), np.where(label == 0, 255, label - 1))
    assert samples["sun-train-img-000002"]["rgb.png"].shape == (1, 3, 48, 64), "sizes vary per sensor"


def test_sunrgbd_toolbox_layout(raw_datasets, tmp_path):
    src = raw_datasets["sunrgbd_toolbox"]
    m = shard("sunrgbd", src, tmp_path, "train")
    samples = _by_key(read_all(m))
    assert sorted(samples) == [f"sun-{i:05d}" for i in fx.SUN_TRAIN]
    assert shard("sunrgbd", src, tmp_path, "test").total_samples == len(fx.SUN_TEST)
    with h5py.File(src / "SUNRGBDtoolbox/Metadata/SUNRGBD2Dseg.mat", "r") as f:
        label = np.asarray(f[f["SUNRGBD2Dseg/seglabel"][2, 0]]).T.astype(np.int64)  # image 3
    s = samples["sun-00003"]
    assert np.array_equal(s["label.png"][0].numpy(), np.where(label == 0, 255, label - 1))
    scene = src / "SUNRGBD" / fx.SUN_SCENES[2]
    assert np.array_equal(s["depth.png"][0, 0].numpy(), _sun_expected_depth(next((scene / "depth").glob("*.png"))))


# -- Taskonomy ------------------------------------------------------------------------------------------


def test_taskonomy_keeps_bit_depth_and_invalid_value(raw_datasets, tmp_path):
    src = tmp_path / "tk"
    shutil.copytree(raw_datasets["taskonomy"], src)
    options = {"domains": "rgb,reshading,edge_texture,depth_zbuffer"}
    m = shard("taskonomy", src, tmp_path / "a", "train", options=options)
    assert m.total_samples == 4 and shard("taskonomy", src, tmp_path / "a", "val", options=options).total_samples == 2
    assert m.modalities["depth_zbuffer.png"].dtype == "uint16" and m.modalities["reshading.png"].dtype == "uint8"
    s = _by_key(read_all(m))["tk-allensville-p000003-v002"]
    assert s["rgb.png"].shape == (1, 3, 32, 32) and s["reshading.png"].shape == (1, 1, 32, 32)
    assert s["edge_texture.png"].dtype == torch.uint16 and s["depth_zbuffer.png"].dtype == torch.uint16
    raw = np.asarray(Image.open(src / "allensville/depth_zbuffer/point_3_view_2_domain_depth_zbuffer.png"))
    assert np.array_equal(s["depth_zbuffer.png"][0, 0].numpy(), raw) and (raw[:2] == 65535).all()

    missing = src / "allensville/edge_texture/point_12_view_0_domain_edge_texture.png"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match="point_12_view_0_domain_edge_texture.png"):
        shard("taskonomy", src, tmp_path / "b", "train", options=options)
    m = shard("taskonomy", src, tmp_path / "c", "train", options=options, skip_bad=True)
    assert (m.total_samples, m.skipped_samples) == (3, 1)


# -- MM-IMDB --------------------------------------------------------------------------------------------


def test_mmimdb_text_labels_and_posters(raw_datasets, tmp_path):
    src = raw_datasets["mmimdb"]
    sizes = {
        split: shard("mmimdb", src, tmp_path, split, options={"image_size": 24}).total_samples
        for split in ("train", "dev", "test")
    }
    assert sizes == {"train": 4, "dev": 1, "test": 2}
    samples = _by_key(read_all(load_manifest(str(tmp_path / "manifest-train.json"))))
    s = samples["imdb-0000012"]  # genres Sci-Fi, Reality-TV (not one of the 23), Action
    assert s["rgb.png"].shape == (1, 3, 24, 24) and s["rgb.png"].dtype == torch.uint8
    assert s["text.txt"] == ["a much longer plot summary number 2 that wins."]
    from pipeline.data.sources.mmimdb import GENRES

    assert s["labels.npy"].shape == (1, 23) and s["labels.npy"].dtype == torch.uint8
    assert {GENRES[i] for i in s["labels.npy"][0].nonzero().flatten().tolist()} == {"Sci-Fi", "Action"}
    assert s["json"][0]["genres"] == ["Sci-Fi", "Reality-TV", "Action"]
