"""Lossless image encoding shared by the shard writer, the sources and the loader.

PNG keeps bit depth: ``uint8`` (H, W) / (H, W, 3) / (H, W, 4) and ``uint16`` (H, W) round-trip exactly.
Pillow opens a 16-bit greyscale PNG as mode ``I;16`` (or ``I`` in older releases), which webdataset 1.0.2's
default image decoder silently scales to 8 bits — hence our own decoder here.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

#: zlib level for written PNGs: 3 is ~3x faster to write than Pillow's default 6 for ~5 % larger shards
PNG_COMPRESS_LEVEL = 3


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a ``uint8`` (H, W[, 3|4]) or ``uint16`` (H, W) array, bit depth preserved."""
    if array.dtype == np.uint16 and array.ndim == 2:
        img = Image.fromarray(np.ascontiguousarray(array))  # mode I;16 -> 16-bit greyscale PNG
    elif array.dtype == np.uint8 and (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
        img = Image.fromarray(np.ascontiguousarray(array))
    else:
        raise ValueError(
            f"cannot encode a {array.dtype} array of shape {array.shape} as PNG "
            "(expected uint8 (H,W), (H,W,3), (H,W,4) or uint16 (H,W))"
        )
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _to_array(img: Image.Image, where: str) -> np.ndarray:
    # np.array, not np.asarray: Pillow's buffer is read-only and torch.from_numpy warns on (and may not
    # write through) read-only arrays.
    if img.mode in ("I;16", "I;16B", "I;16L"):
        return np.array(img).astype(np.uint16, copy=False)
    if img.mode == "I":  # 16-bit PNG opened as 32-bit int by some Pillow builds
        a = np.array(img)
        if a.min() < 0 or a.max() > 65535:
            raise ValueError(f"{where}: 32-bit integer image does not fit 16 bits")
        return a.astype(np.uint16)
    if img.mode in ("L", "P", "RGB", "RGBA"):  # "P": palette indices are the label values
        return np.array(img)
    if img.mode in ("1", "LA", "CMYK", "YCbCr"):
        return np.array(img.convert("RGB" if img.mode in ("CMYK", "YCbCr") else "L"))
    raise ValueError(f"{where}: unsupported image mode {img.mode}")


def decode_image_bytes(data: bytes, where: str) -> np.ndarray:
    """Decode PNG/JPEG bytes to a numpy array keeping the stored bit depth; ``ValueError`` naming ``where``."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _to_array(img, where)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{where}: unreadable image ({exc})") from exc


def read_image_file(path: str) -> np.ndarray:
    """Read an image file keeping its bit depth; ``FileNotFoundError``/``ValueError`` naming the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as f:
        return decode_image_bytes(f.read(), path)
