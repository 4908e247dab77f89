"""The embedded task datasets: the image+text genre set (MM-IMDB layout) and the task splits of the scenes / stereo pair."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data import load_manifest
from pipeline.data.sources import movies, open_source
from pipeline.data.sources.mmimdb import GENRES
from tests.data.util import read_all, run_cli, shard


@pytest.fixture(scope="module")
def movie_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("movies")
    r = run_cli("make-movies", "--out", str(out), "--train", "40", "--dev", "12", "--test", "12", "--seed", "3")
    assert r.returncode == 0, r.stderr
    return out


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{a\}", r"\w+").replace(r"\{b\}", r"\w+"))


TEMPLATES = {g: [_template_regex(t) for t in ts] for g, ts in movies.TEXT_GENRES.items()}


def _movies(folder):
    split = json.loads((folder / "split.json").read_text())
    for name, ids in split.items():
        for movie_id in ids:
            meta = json.loads((folder / "dataset" / f"{movie_id}.json").read_text())
            yield name, movie_id, meta


def test_genres_split_into_image_only_and_text_only_halves(movie_folder):
    assert len(movies.IMAGE_GENRES) == 11 and len(movies.TEXT_GENRES) == 12
    seen = set()
    for _, movie_id, meta in _movies(movie_folder):
        genres = set(meta["genres"])
        assert genres and genres <= set(GENRES)
        seen |= genres
        plot = max(meta["plot"], key=len)
        assert isinstance(plot, str) and plot.endswith(".")
        # the text decides exactly the text genres: each has one of its sentences in the plot, no other does
        in_text = {g for g, pats in TEMPLATES.items() if any(p.search(plot) for p in pats)}
        assert in_text == genres & set(movies.TEXT_GENRES), movie_id
        # the poster decides exactly the image genres: one motif tile each, nothing for the text genres
        assert set(meta["poster_tiles"]) == genres & set(movies.IMAGE_GENRES), movie_id
    assert len(seen) >= 20  # the split exercises (nearly) every genre


def test_poster_tiles_are_motif_crops_from_disjoint_regions(movie_folder):
    checked = 0
    for split, movie_id, meta in _movies(movie_folder):
        poster = np.asarray(Image.open(movie_folder / "dataset" / f"{movie_id}.jpeg")).astype(np.float64)
        q = movies.POSTER // 2
        for genre, tile in meta["poster_tiles"].items():
            img = movies.motif(movies.IMAGE_GENRES[genre])
            y, x, s = tile["crop_yxs"]
            cut = int(img.shape[1] * movies.TRAIN_FRACTION)
            if split == "train":
                assert x + s <= cut
            else:
                assert x >= cut  # held-out posters never show a pixel a training poster could show
            crop = np.asarray(
                Image.fromarray(img[y : y + s, x : x + s]).resize((q, q), Image.Resampling.BICUBIC)
            ).astype(np.float64)
            r, c = divmod(tile["quadrant"], 2)
            quad = poster[r * q : (r + 1) * q, c * q : (c + 1) * q]
            err = min(np.abs(quad - crop).mean(), np.abs(quad - crop[:, ::-1]).mean())  # tiles may be mirrored
            assert err < 6.0, (movie_id, genre, err)  # JPEG q95 noise only
            checked += 1
    assert checked > 10


def test_movie_folder_shards_through_the_mmimdb_source(movie_folder, tmp_path):
    sizes = {
        s: shard("mmimdb", movie_folder, tmp_path, s, options={"image_size": 32}).total_samples
        for s in ("train", "dev", "test")
    }
    assert sizes == {"train": 40, "dev": 12, "test": 12}
    samples = read_all(load_manifest(str(tmp_path / "manifest-dev.json")))
    for s in samples:
        meta = json.loads((movie_folder / "dataset" / f"{s['__key__'][0][len('imdb-') :]}.json").read_text())
        assert s["rgb.png"].shape == (1, 3, 32, 32)
        assert s["text.txt"] == [max(meta["plot"], key=len)]  # real text strings reach the batch
        assert {GENRES[i] for i in s["labels.npy"][0].nonzero().flatten().tolist()} == set(meta["genres"])


def test_movie_folder_is_determined_by_the_seed(tmp_path):
    movies.write_movie_folder(str(tmp_path / "a"), 3, 1, 1, seed=5)
    movies.write_movie_folder(str(tmp_path / "b"), 3, 1, 1, seed=5)
    movies.write_movie_folder(str(tmp_path / "c"), 3, 1, 1, seed=6)
    files = sorted(p.name for p in (tmp_path / "a" / "dataset").iterdir())
    same = [
        (tmp_path / "a" / "dataset" / f).read_bytes() == (tmp_path / "b" / "dataset" / f).read_bytes() for f in files
    ]
    assert all(same)
    assert (tmp_path / "a" / "dataset" / files[0]).read_bytes() != (tmp_path / "c" / "dataset" / files[0]).read_bytes()
    with pytest.raises(ValueError, match="at least one movie"):
        movies.write_movie_folder(str(tmp_path / "d"), 3, 0, 1)


def test_segmentation_and_translation_splits_are_disjoint():
    # segmentation: held-out scenes are other seeds (other layouts, cameras), never a re-render of a train scene
    scenes = open_source("embedded", "scenes", scenes=8)
    assert not set(scenes.keys("train")) & set(scenes.keys("val"))
    # translation (left RGB + depth -> right view): val patch columns start one patch right of the train region
    stereo = open_source("embedded", "stereo", patch=16, downscale=4)
    x_train = [int(k.split("-x")[1]) for k in stereo.keys("train")]
    x_val = [int(k.split("-x")[1]) for k in stereo.keys("val")]
    assert max(x_train) + 16 <= min(x_val) - 16
    assert set(stereo.modalities("val")) >= {"rgb.png", "depth.png", "right.png"}


def test_top_view_scenes_low_and_tall_boxes_differ_only_in_depth(tmp_path):
    m = shard("embedded", "scenes", tmp_path, "train", options={"scenes": 16, "size": 48, "view": "top"})
    rgb, depth = {1: [], 2: []}, {1: [], 2: []}  # 1 = low_box, 2 = tall_box
    for s in read_all(m):
        label = s["label.png"][0]
        assert s["depth.png"].dtype == torch.uint16  # 16-bit millimetres
        for c in (1, 2):
            mask = label == c
            rgb[c].append(s["rgb.png"][0].permute(1, 2, 0)[mask].double())
            depth[c].append(s["depth.png"][0].reshape(label.shape)[mask].double())
    rgb = {c: torch.cat(v) for c, v in rgb.items()}
    depth = {c: torch.cat(v) for c, v in depth.items()}
    assert min(len(rgb[1]), len(rgb[2])) > 100
    # same grey in RGB (a few levels of edge shading) ...
    assert (rgb[1].mean(0) - rgb[2].mean(0)).abs().max() < 6
    # ... while the camera sees the tall boxes' tops 16 cm closer (0.44 m vs 0.12 m high): only depth tells
    assert depth[1].mean() - depth[2].mean() > 250
    with pytest.raises(ValueError, match="--view must be"):
        open_source("embedded", "scenes", view="side")
    with pytest.raises(ValueError, match="apply only to the other"):
        open_source("embedded", "stereo", view="top")
