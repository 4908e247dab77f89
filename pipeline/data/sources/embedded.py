"""Real data shipped inside installed packages, so the demo and tests need no download.

``--src stereo`` — the Middlebury 2014 *Motorcycle* pair from ``skimage.data.stereo_motorcycle()``:
left view ``rgb.png`` (uint8 (P, P, 3)), right view ``right.png`` (same pixel window of the rectified right
image; the second view of the stereo pair, named ``right`` rather than ``rgb_right``), and ``depth.png``
(uint16 (P, P), millimetres, 0 = no ground truth), with ``Z[mm] = f·B / (d + doffs)``, f = 994.978 px,
B = 193.001 mm, doffs = 31.086 px, from the ground-truth disparity ``d`` (``inf`` = invalid → 0).
The image is first reduced by ``--downscale s`` (area mean for RGB; depth = mean of the valid full-resolution
depths in each s×s block, 0 when fewer than half are valid), then cut into P×P patches. **Train and val
come from disjoint image regions**: train patches lie in the left 3/4 of the columns (stride
``--stride``, default P/2), val patches in the columns right of that, after a gap of one patch (stride P),
so no val pixel was ever seen in training, even through an overlapping patch. ``--holdout f`` holds out the
right fraction f of the columns instead of 1/4, and ``--val-stride`` cuts the held-out patches at that stride
(they may then overlap each other, never the training region): at ``--downscale 5`` the default held-out
strip is 21 px wide, one 16 px patch column, 6 patches.

``--shift R`` (the non-local task): adds ``shifted.png``, the right view's window displaced horizontally by a
per-sample offset of R/2..R px, either sign (from a hash of the key, so deterministic), next to the registered
``right.png``; windows keep R px from their split's region edges so the displaced window never leaves it. Predicting
the registered right view from the left view + the shifted one means finding a correspondence R/2..R px away: with
``R = 16`` that lies beyond the receptive field of the translation demo's conv encoder (patch 2: a stride-2 3×3
conv then a 3×3 conv, 7 px), so per-position fusion (concat) cannot align the two inputs and attention can.

``--src scenes`` — RGB-D scenes rendered by pybullet's CPU TinyRenderer (``pybullet.DIRECT``): the
``plane.urdf`` floor and the duck mesh from ``pybullet_data`` plus primitive solids, placed by a seeded RNG
(train seeds 0.., val seeds 1000000..). ``label.png`` holds the exact per-pixel class (uint8, 255 = sky /
no object). Three classes (low box, tall box, cylinder) share one colour and footprint size and differ
only in shape or height, so only depth separates them reliably. ``depth.png`` is metric z-depth in mm
from the z-buffer (0 = sky).

``--view top`` (the segmentation task's set) looks straight down from 8 m with a narrow (10°) field of view, light
from above and no shadows, and draws each box's footprint size at random (half-extent 8–12 cm): a
low box and a tall box are then the same grey square in RGB (no side faces, no shadow length, no size
cue), so **only depth separates them**; ``--view orbit`` (default) is the oblique camera above.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import random
from typing import Any

import numpy as np
from skimage.data import stereo_motorcycle

from ..manifest import ModalitySpec
from . import Source

# Middlebury 2014 Motorcycle calibration (calib.txt of the scikit-image copy)
FOCAL_PX, BASELINE_MM, DOFFS_PX = 994.978, 193.001, 31.086
TRAIN_FRACTION = 0.75
VAL_SEED_OFFSET = 1_000_000

SCENE_CLASSES = ("floor", "low_box", "tall_box", "cylinder", "sphere", "duck")
_GREY = (0.55, 0.55, 0.6, 1.0)
NEAR_M, FAR_M = 0.1, 10.0


@functools.lru_cache(maxsize=4)
def stereo_arrays(downscale: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(left (H,W,3) uint8, right (H,W,3) uint8, depth (H,W) uint16 mm) after ``downscale``; cached."""
    left, right, disparity = stereo_motorcycle()
    disparity = disparity.astype(np.float64)  # float32 arithmetic would round some depths to the wrong mm
    valid = np.isfinite(disparity)
    depth = np.where(valid, FOCAL_PX * BASELINE_MM / (np.where(valid, disparity, 0.0) + DOFFS_PX), 0.0)
    s = downscale
    h, w = (left.shape[0] // s) * s, (left.shape[1] // s) * s

    def blocks(a: np.ndarray) -> np.ndarray:
        return a[:h, :w].reshape(h // s, s, w // s, s, *a.shape[2:])

    left_s = blocks(left.astype(np.float64)).mean(axis=(1, 3)).round().astype(np.uint8)
    right_s = blocks(right.astype(np.float64)).mean(axis=(1, 3)).round().astype(np.uint8)
    count = blocks(valid.astype(np.float64)).sum(axis=(1, 3))
    total = blocks(depth).sum(axis=(1, 3))
    depth_s = np.where(count >= s * s / 2, total / np.maximum(count, 1), 0.0)
    return left_s, right_s, np.clip(depth_s.round(), 0, 65535).astype(np.uint16)


def stereo_regions(width: int, patch: int, holdout: float = 1.0 - TRAIN_FRACTION) -> dict[str, tuple[int, int]]:
    """Column ranges ``[x0, x1)`` of the train and val regions (disjoint, one patch apart); val = the right
    ``holdout`` fraction of the columns."""
    cut = int(width * TRAIN_FRACTION) if holdout == 1.0 - TRAIN_FRACTION else int(width * (1.0 - holdout))
    return {"train": (0, cut), "val": (cut + patch, width)}


class EmbeddedSource(Source):
    name = "embedded"
    OPTIONS = {
        "patch": (int, 32, "stereo: patch size P in pixels (after --downscale)"),
        "stride": (int, 0, "stereo: train patch stride (0 = P/2)"),
        "val_stride": (int, 0, "stereo: held-out patch stride (0 = P: held-out patches do not overlap each other)"),
        "holdout": (float, 1.0 - TRAIN_FRACTION, "stereo: fraction of the image columns (the right ones) held out"),
        "downscale": (int, 1, "stereo: integer area downscale of the whole image before cutting patches"),
        "shift": (
            int,
            0,
            "stereo: add shifted.png, the right view displaced by a per-sample horizontal offset of "
            "R/2..R px, either sign (seeded by the key): an unregistered second view (0 = none)",
        ),
        "size": (int, 64, "scenes: rendered image size (square)"),
        "scenes": (int, 0, "scenes: number of scenes per split (0 = 96 train / 32 val)"),
        "view": (
            str,
            "orbit",
            "scenes: camera 'orbit' (oblique) or 'top' (straight down: low and tall boxes "
            "look alike in RGB, only depth separates them)",
        ),
    }
    _FOREIGN = {
        "stereo": ("size", "scenes", "view"),
        "scenes": ("patch", "stride", "downscale", "val_stride", "holdout", "shift"),
    }
    _QUIET = {
        "val_stride",
        "holdout",
        "shift",
    }  # left out of config() at their defaults: older shards keep their checksums

    def __init__(self, src: str | None, **options: Any) -> None:
        super().__init__(src or "stereo", **options)
        if self.src not in ("stereo", "scenes"):
            raise ValueError(f"embedded: --src must be 'stereo' or 'scenes', got {self.src!r}")
        o = self.options
        foreign = [k for k in self._FOREIGN[self.src] if o[k] != self.OPTIONS[k][1]]
        if foreign:
            raise ValueError(f"embedded --src {self.src}: option(s) {foreign} apply only to the other embedded source")
        if o["view"] not in ("orbit", "top"):
            raise ValueError(f"embedded: --view must be 'orbit' or 'top', got {o['view']!r}")
        if not 0.0 < o["holdout"] < 1.0:
            raise ValueError(
                f"embedded stereo: --holdout must be a fraction in (0, 1) of the columns; got {o['holdout']}"
            )
        if (
            o["patch"] < 4
            or o["downscale"] < 1
            or o["stride"] < 0
            or o["val_stride"] < 0
            or o["size"] < 8
            or o["scenes"] < 0
            or o["shift"] < 0
        ):
            raise ValueError(f"embedded: invalid options {o}")

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", "val")

    def config(self) -> dict[str, Any]:
        own = {
            k: v
            for k, v in self.options.items()
            if k not in self._FOREIGN[self.src] and not (k in self._QUIET and v == self.OPTIONS[k][1])
        }
        return {"source": self.name, "src": self.src, **own}

    # -- stereo ------------------------------------------------------------------------------------------
    def _stereo_windows(self, split: str) -> list[tuple[int, int]]:
        p, s = self.options["patch"], self.options["downscale"]
        left, _, _ = stereo_arrays(s)
        h, w = left.shape[:2]
        x0, x1 = stereo_regions(w, p, self.options["holdout"])[split]
        stride = (self.options["val_stride"] or p) if split == "val" else (self.options["stride"] or max(1, p // 2))
        r = self.options["shift"]  # the shifted window must stay inside the split's own columns
        x0, x1 = x0 + r, x1 - r
        if x1 - x0 < p or h < p:
            raise ValueError(
                f"embedded stereo: the {split} region ({max(0, x1 - x0)}x{h} px after --downscale {s}"
                f"{f' and ±{r} px of --shift' if r else ''}) is narrower than one {p}px patch; use a "
                "smaller --patch, --shift or --downscale"
            )
        return [(y, x) for y in range(0, h - p + 1, stride) for x in range(x0, x1 - p + 1, stride)]

    def shift_of(self, key: str) -> int:
        """The key's horizontal offset of ``shifted.png`` (px): R/2..R in magnitude, either sign, from its hash."""
        r = self.options["shift"]
        h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
        magnitude = r - r // 2
        return (r // 2 + h % (magnitude + 1)) * (1 if (h >> 32) % 2 else -1)

    # -- scenes ------------------------------------------------------------------------------------------
    def _scene_count(self, split: str) -> int:
        return self.options["scenes"] or (96 if split == "train" else 32)

    def modalities(self, split: str) -> dict[str, ModalitySpec]:
        self.check_split(split)
        if self.src == "stereo":
            p = self.options["patch"]
            shifted = (
                {
                    "shifted.png": ModalitySpec(
                        "uint8", "image", (p, p, 3), "8-bit sRGB, right view displaced by a per-sample offset"
                    )
                }
                if self.options["shift"]
                else {}
            )
            return {
                "rgb.png": ModalitySpec("uint8", "image", (p, p, 3), "8-bit sRGB, left view"),
                "right.png": ModalitySpec("uint8", "image", (p, p, 3), "8-bit sRGB, right view"),
                "depth.png": ModalitySpec("uint16", "depth", (p, p), "1 mm, 0 = invalid"),
                **shifted,
                "json": ModalitySpec("json", "meta"),
            }
        n = self.options["size"]
        return {
            "rgb.png": ModalitySpec("uint8", "image", (n, n, 3), "8-bit sRGB"),
            "depth.png": ModalitySpec("uint16", "depth", (n, n), "1 mm z-depth, 0 = invalid"),
            "label.png": ModalitySpec("uint8", "label", (n, n), "class index", SCENE_CLASSES, 255),
            "json": ModalitySpec("json", "meta"),
        }

    def keys(self, split: str) -> list[str]:
        self.check_split(split)
        if self.src == "stereo":
            p, s = self.options["patch"], self.options["downscale"]
            return [f"motorcycle-s{s}-p{p}-y{y:04d}-x{x:04d}" for y, x in self._stereo_windows(split)]
        base = 0 if split == "train" else VAL_SEED_OFFSET
        return [f"scene-{base + i:07d}" for i in range(self._scene_count(split))]

    def load(self, split: str, key: str) -> dict[str, Any]:
        if self.src == "stereo":
            y, x = (int(part[1:]) for part in key.split("-")[-2:])
            p, s = self.options["patch"], self.options["downscale"]
            left, right, depth = stereo_arrays(s)
            win = (slice(y, y + p), slice(x, x + p))
            sample = {
                "rgb.png": left[win].copy(),
                "right.png": right[win].copy(),
                "depth.png": depth[win].copy(),
                "json": {"scene": "middlebury-2014-motorcycle", "y": y, "x": x, "downscale": s, "split": split},
            }
            if self.options["shift"]:
                dx = self.shift_of(key)
                sample["shifted.png"] = right[y : y + p, x + dx : x + dx + p].copy()
                sample["json"]["shift"] = dx  # metadata for analysis, never a model input
            return sample
        return render_scene(int(key.split("-")[1]), self.options["size"], view=self.options["view"])


# -- pybullet scenes -----------------------------------------------------------------------------------

_CLIENT: dict[int, int] = {}


def _client() -> int:
    """One DIRECT pybullet client per process (created on first use, never inherited through fork)."""
    import pybullet as pb  # heavy: C extension that prints a build banner on import; only --src scenes needs it
    import pybullet_data  # heavy: ships with pybullet; only --src scenes needs it

    cid = _CLIENT.get(os.getpid())
    if cid is None:
        cid = pb.connect(pb.DIRECT)
        pb.setAdditionalSearchPath(pybullet_data.getDataPath(), physicsClientId=cid)
        _CLIENT.clear()
        _CLIENT[os.getpid()] = cid
    return cid


def _add_solid(pb: Any, cid: int, cls: str, xy: tuple[float, float], yaw: float, half: float = 0.1) -> int:
    if cls == "low_box":
        shape, half_h = dict(shapeType=pb.GEOM_BOX, halfExtents=[half, half, 0.06]), 0.06
    elif cls == "tall_box":
        shape, half_h = dict(shapeType=pb.GEOM_BOX, halfExtents=[half, half, 0.22]), 0.22
    elif cls == "cylinder":
        shape, half_h = dict(shapeType=pb.GEOM_CYLINDER, radius=0.1, length=0.3), 0.15
    else:  # sphere
        shape, half_h = dict(shapeType=pb.GEOM_SPHERE, radius=0.1), 0.1
    colour = [0.8, 0.25, 0.2, 1.0] if cls == "sphere" else list(_GREY)
    visual = pb.createVisualShape(rgbaColor=colour, physicsClientId=cid, **shape)
    return pb.createMultiBody(
        0,
        -1,
        visual,
        basePosition=[xy[0], xy[1], half_h],
        baseOrientation=pb.getQuaternionFromEuler([0, 0, yaw]),
        physicsClientId=cid,
    )


def render_scene(seed: int, size: int, view: str = "orbit") -> dict[str, Any]:
    """Render scene ``seed``: rgb (size,size,3) uint8, depth (size,size) uint16 mm, label (size,size) uint8.

    ``view``: ``"orbit"`` (oblique camera, shadows) or ``"top"`` (straight down, see the module docstring).
    """
    import pybullet as pb  # heavy: C extension that prints a build banner on import; only --src scenes needs it

    cid = _client()
    rng = random.Random(f"mango-scene-{seed}")
    pb.resetSimulation(physicsClientId=cid)
    body_class, objects = _place_objects(pb, cid, rng, view)
    cam = _camera(rng, view)
    view_matrix = pb.computeViewMatrix(cam["eye"], cam["target"], cam["up"], physicsClientId=cid)
    proj = pb.computeProjectionMatrixFOV(cam["fov"], 1.0, NEAR_M, FAR_M, physicsClientId=cid)
    _, _, rgba, zbuf, seg = pb.getCameraImage(
        size,
        size,
        view_matrix,
        proj,
        renderer=pb.ER_TINY_RENDERER,
        shadow=cam["shadow"],
        lightDirection=cam["light"],
        physicsClientId=cid,
    )
    rgb, depth, label = _decode_camera_image(rgba, zbuf, seg, size, body_class)
    meta = {
        "seed": seed,
        "camera": {
            "azimuth": round(cam["azimuth"], 4),
            "elevation": round(cam["elevation"], 3),
            "distance": round(cam["distance"], 4),
            "fov": cam["fov"],
            "view": view,
        },
        "objects": objects,
        "classes": list(SCENE_CLASSES),
    }
    return {"rgb.png": rgb, "depth.png": depth, "label.png": label, "json": meta}


def _place_objects(pb: Any, cid: int, rng: random.Random, view: str) -> tuple[dict[int, int], list[dict[str, Any]]]:
    """Load the floor and 3–6 objects on non-overlapping footprints: ({body id: class index}, object records)."""
    body_class = {pb.loadURDF("plane.urdf", physicsClientId=cid): 0}
    placed: list[tuple[float, float]] = []
    objects = []
    for _ in range(rng.randint(3, 6)):
        for _attempt in range(50):  # rejection-sample non-overlapping footprints
            xy = (rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5))
            if all(math.dist(xy, q) > 0.3 for q in placed):
                break
        else:
            continue
        placed.append(xy)
        cls = rng.choice(SCENE_CLASSES[1:])
        yaw = rng.uniform(0, math.pi)
        if cls == "duck":
            body = pb.loadURDF(
                "duck_vhacd.urdf",
                [xy[0], xy[1], 0.0],
                pb.getQuaternionFromEuler([math.pi / 2, 0, yaw]),
                globalScaling=2.0,
                physicsClientId=cid,
            )
        elif view == "top":  # footprint drawn per object, so square size says nothing about height
            body = _add_solid(pb, cid, cls, xy, yaw, half=rng.uniform(0.08, 0.12))
        else:
            body = _add_solid(pb, cid, cls, xy, yaw)
        body_class[body] = SCENE_CLASSES.index(cls)
        objects.append({"class": cls, "x": round(xy[0], 4), "y": round(xy[1], 4), "yaw": round(yaw, 4)})
    return body_class, objects


def _camera(rng: random.Random, view: str) -> dict[str, Any]:
    """The camera and light: eye, target, up, fov, shadow, light, and the azimuth/elevation/distance recorded."""
    azimuth, elevation, distance = rng.uniform(0, 2 * math.pi), rng.uniform(35, 60), rng.uniform(1.3, 1.7)
    el = math.radians(elevation)
    eye = [
        distance * math.cos(el) * math.cos(azimuth),
        distance * math.cos(el) * math.sin(azimuth),
        distance * math.sin(el),
    ]
    fov, shadow, light = 55, 1, [math.cos(azimuth + 1.0), math.sin(azimuth + 1.0), 1.5]
    if view == "top":  # far and narrow: box sides stay out of sight; light from above, no shadows
        eye, target, up = [0, 0, 8.0], [0, 0, 0], [math.cos(azimuth), math.sin(azimuth), 0]
        fov, shadow, light, elevation, distance = 10, 0, [0, 0, 1], 90.0, 8.0
    else:
        target, up = [0, 0, 0.1], [0, 0, 1]
    return {
        "eye": eye,
        "target": target,
        "up": up,
        "fov": fov,
        "shadow": shadow,
        "light": light,
        "azimuth": azimuth,
        "elevation": elevation,
        "distance": distance,
    }


def _decode_camera_image(
    rgba: Any, zbuf: Any, seg: Any, size: int, body_class: dict[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TinyRenderer's buffers → rgb (uint8), metric depth in mm (uint16, 0 = sky), class label (uint8, 255 = sky)."""
    rgb = np.asarray(rgba, dtype=np.uint8).reshape(size, size, 4)[:, :, :3].copy()
    seg = np.asarray(seg, dtype=np.int64).reshape(size, size)
    zbuf = np.asarray(zbuf, dtype=np.float64).reshape(size, size)
    depth_m = FAR_M * NEAR_M / (FAR_M - (FAR_M - NEAR_M) * zbuf)  # OpenGL z-buffer -> metric z-depth
    body = np.where(seg >= 0, seg & ((1 << 24) - 1), -1)  # low 24 bits: body id; high bits: link
    label = np.full((size, size), 255, dtype=np.uint8)
    for b, c in body_class.items():
        label[body == b] = c
    depth = np.where(seg >= 0, np.clip(np.round(depth_m * 1000.0), 1, 65535), 0).astype(np.uint16)
    return rgb, depth, label


SOURCE_CLASS = EmbeddedSource
