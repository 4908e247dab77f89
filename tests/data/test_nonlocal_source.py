"""The embedded non-local task (``embedded --src stereo --shift R``): an unregistered second view, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data.sources.embedded import EmbeddedSource, stereo_arrays, stereo_regions

OPTS = {"patch": 24, "downscale": 3, "stride": 4, "holdout": 0.35, "val_stride": 4}


def test_shifted_view_is_the_right_view_displaced_by_r_half_to_r_inside_the_split() -> None:
    src = EmbeddedSource("stereo", **OPTS, shift=16)
    _, right, _ = stereo_arrays(3)
    for split in ("train", "val"):
        x0, x1 = stereo_regions(right.shape[1], 24, 0.35)[split]
        keys = src.keys(split)
        assert keys, split
        shifts = []
        for key in keys[:: max(1, len(keys) // 40)]:
            s = src.load(split, key)
            y, x, dx = s["json"]["y"], s["json"]["x"], s["json"]["shift"]
            assert 8 <= abs(dx) <= 16 and x0 <= x + dx and x + dx + 24 <= x1  # never leaves its split's columns
            np.testing.assert_array_equal(s["shifted.png"], right[y : y + 24, x + dx : x + dx + 24])
            shifts.append(dx)
        assert min(shifts) < 0 < max(shifts)  # both directions occur
    assert src.load("val", src.keys("val")[3])["json"]["shift"] == src.shift_of(src.keys("val")[3])  # by key


def test_without_shift_the_source_and_its_checksummed_config_are_unchanged() -> None:
    plain = EmbeddedSource("stereo", **OPTS)
    assert "shift" not in plain.config() and "shifted.png" not in plain.modalities("train")
    assert EmbeddedSource("stereo", **OPTS, shift=16).config()["shift"] == 16


def test_a_shift_too_wide_for_the_held_out_region_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="narrower than one 24px patch.*--shift"):
        EmbeddedSource("stereo", **OPTS, shift=40).keys("val")


def test_the_nonlocal_demo_config_loads() -> None:
    cfg = load_config("launch/configs/nonlocal_demo.yaml", [])
    assert list(cfg.data.modalities) == ["shifted", "rgb", "right"] and cfg.model.warp_range >= 16
