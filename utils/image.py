"""Reading source images, pairing folders, colour handling and saving fused results.

Colour follows the released pipeline: images are read as RGB float32 in [0,255] and converted to
YCrCb with OpenCV; the networks see Y/255. Chroma comes from the colour source, or from both
through the release's weighting rule (``fuse_chroma``).
"""
import os

import cv2
import numpy as np

from utils.atomic import write_bytes_atomic
from utils.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class ImageError(UserError):
    """A user-facing problem with an input or output image (one-line message)."""


def decode(path):
    """Image file -> the array OpenCV decodes: uint8, uint16 or float; grey, BGR or BGRA."""
    if not os.path.isfile(path):
        raise ImageError(f"image not found: {path}")
    data = np.fromfile(path, dtype=np.uint8)  # imdecode also copes with non-ASCII paths
    image = cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR) if data.size else None
    if image is None:
        raise ImageError(f"cannot read image {path}: not a supported image file or corrupt")
    if image.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        raise ImageError(f"cannot read image {path}: unsupported pixel type {image.dtype}")
    if image.ndim == 3 and image.shape[2] not in (3, 4):
        raise ImageError(f"cannot read image {path}: {image.shape[2]} channels are not supported")
    return image


def to_rgb(image):
    """A decoded image (or a band of its rows) -> ``(H,W,3)`` float32 RGB in [0,255]: 16-bit
    scaled by 255/65535, float clipped to [0,1] and scaled, grey repeated in three channels (the
    release reads everything as colour), alpha dropped."""
    if image.dtype == np.uint8:
        image = image.astype(np.float32)
    elif image.dtype == np.uint16:
        image = image.astype(np.float32) * np.float32(255 / 65535)
    else:
        image = np.clip(image.astype(np.float32), 0, 1) * np.float32(255)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)


def read_rgb(path):
    """Image file -> ``(H,W,3)`` float32 RGB in [0,255] (``to_rgb(decode(path))``)."""
    return to_rgb(decode(path))


def is_grey(image):
    """True when an RGB image's three channels are equal (a grey image stored as colour counts as
    grey); also for a decoded image (``decode``), whose grey form has no channel axis."""
    return image.ndim == 2 or bool(np.array_equal(image[..., 0], image[..., 1])
                                   and np.array_equal(image[..., 1], image[..., 2]))


def to_ycrcb(rgb):
    """``(H,W,3)`` float32 RGB [0,255] -> ``(H,W,3)`` float32 YCrCb [0,255] (OpenCV)."""
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2YCrCb)


def fuse_chroma(chroma1, chroma2):
    """Released rule for two colour sources, on ``(H,W,2)`` CrCb in [0,255].

    ``C = (C1*|C1-0.5| + C2*|C2-0.5|) / (|C1-0.5| + |C2-0.5| + 1e-4)``. The release writes 0.5 as
    the neutral chroma although its chroma is on the 0-255 scale (neutral 128); we keep the
    released formula so outputs match the authors' pipeline.
    """
    weight1 = np.abs(chroma1 - 0.5)
    weight2 = np.abs(chroma2 - 0.5)
    return (chroma1 * weight1 + chroma2 * weight2) / (weight1 + weight2 + 1e-4)


def output_chroma(rgb1, rgb2, ycrcb1, ycrcb2):
    """Chroma for the fused image, or None when both sources are grey."""
    grey1, grey2 = is_grey(rgb1), is_grey(rgb2)
    if grey1 and grey2:
        return None
    if grey1:
        return ycrcb2[..., 1:]
    if grey2:
        return ycrcb1[..., 1:]
    return fuse_chroma(ycrcb1[..., 1:], ycrcb2[..., 1:])


def stretch(fused, bounds=None):
    """Min-max normalise a fused map to [0,1] as the release does; a constant map is left as is.
    ``bounds``: the whole map's (min, max) when ``fused`` is a band of it."""
    low, high = bounds or (float(fused.min()), float(fused.max()))
    if high > low:
        return (fused - low) / (high - low)
    return fused


def to_uint8(values):
    return np.round(np.clip(values, 0, 255)).astype(np.uint8)


def colourise(grey255, chroma):
    """Fused Y in [0,255] ``(H,W)`` + CrCb ``(H,W,2)`` -> RGB uint8 ``(H,W,3)``."""
    ycrcb = np.concatenate([grey255[..., None], chroma], axis=2).astype(np.float32)
    return to_uint8(cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2RGB))


def write_png(path, image):
    """Write a uint8 grey ``(H,W)`` or RGB ``(H,W,3)`` PNG atomically (temp file + rename)."""
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise ImageError(f"cannot encode {path}")
    write_bytes_atomic(path, encoded.tobytes())


def list_images(folder):
    """``{stem: path}`` for the images in a folder; an error for duplicated stems."""
    if not os.path.isdir(folder):
        raise ImageError(f"folder not found: {folder}")
    found = {}
    for name in sorted(os.listdir(folder)):
        stem, extension = os.path.splitext(name)
        if extension.lower() not in IMAGE_EXTENSIONS or not os.path.isfile(os.path.join(folder, name)):
            continue
        if stem in found:
            raise ImageError(f"two images named '{stem}' in {folder}: "
                             f"{os.path.basename(found[stem])} and {name}")
        found[stem] = os.path.join(folder, name)
    return found


def pair_images(source1, source2):
    """Pairs ``[(stem, path1, path2)]`` from two files or two folders (matched by file stem)."""
    if os.path.isfile(source1) and os.path.isfile(source2):
        return [(os.path.splitext(os.path.basename(source1))[0], source1, source2)]
    for source in (source1, source2):
        if not os.path.exists(source):
            raise ImageError(f"not found: {source}")
    if os.path.isfile(source1) != os.path.isfile(source2):
        raise ImageError(f"give two files or two folders, not a mix: {source1}, {source2}")
    images1, images2 = list_images(source1), list_images(source2)
    if not images1 and not images2:
        raise ImageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {source1} or {source2}")
    only1 = sorted(set(images1) - set(images2))
    only2 = sorted(set(images2) - set(images1))
    if only1 or only2:
        parts = []
        if only1:
            parts.append(f"only in {source1}: {', '.join(only1)}")
        if only2:
            parts.append(f"only in {source2}: {', '.join(only2)}")
        raise ImageError("unpaired images (pairs are matched by file name without extension); "
                         + "; ".join(parts))
    return [(stem, images1[stem], images2[stem]) for stem in sorted(images1)]
