"""The inference pipeline: a pair of image files -> fused grey (and colour) images.

Large images pass through in bands of rows: the colour conversions are per pixel, so a band
gives the values the whole image would, and only the networks' input, the output chroma and the
results exist at full size.
"""
import numpy as np
import torch

from utils import tiled
from utils.errors import UserError
from utils.image import (ImageError, colourise, decode, fuse_chroma, is_grey, read_rgb, stretch, to_rgb,
                         to_uint8, to_ycrcb)

BAND_ROWS = 256


class FusionOutOfMemory(UserError):
    pass


def read_pair(path1, path2):
    """Both sources as RGB float32 [0,255]; an error naming the pair if the sizes differ."""
    rgb1, rgb2 = read_rgb(path1), read_rgb(path2)
    check_sizes(path1, path2, rgb1, rgb2)
    return rgb1, rgb2


def check_sizes(path1, path2, image1, image2):
    if image1.shape[:2] != image2.shape[:2]:
        raise ImageError(f"size mismatch: {path1} is {image1.shape[1]}x{image1.shape[0]} but "
                         f"{path2} is {image2.shape[1]}x{image2.shape[0]} (sources must be registered)")


def luma_batch(ycrcb1, ycrcb2):
    """The networks' input from two YCrCb [0,255] images: ``(1,2,H,W)`` float32 Y in [0,1]."""
    return torch.from_numpy(np.stack([ycrcb1[..., 0], ycrcb2[..., 0]])[None] / np.float32(255))


def source_planes(path1, path2):
    """The networks' input ``(2,H,W)`` float32 (Y/255 of both sources) and the output's chroma
    ``(H,W,2)`` float32 CrCb (the colour source's, the release's weighted rule for two colour
    sources, None for two grey ones), converted band by band."""
    images = decode(path1), decode(path2)
    check_sizes(path1, path2, *images)
    height, width = images[0].shape[:2]
    colour = [not is_grey(image) for image in images]
    luma = np.empty((2, height, width), np.float32)
    chroma = np.empty((height, width, 2), np.float32) if any(colour) else None
    for top in range(0, height, BAND_ROWS):
        band = slice(top, top + BAND_ROWS)
        ycrcb = [to_ycrcb(to_rgb(image[band])) for image in images]
        for plane, converted in zip(luma, ycrcb):
            plane[band] = converted[..., 0] / np.float32(255)
        if chroma is not None:
            chroma[band] = (fuse_chroma(ycrcb[0][..., 1:], ycrcb[1][..., 1:]) if all(colour)
                            else ycrcb[colour.index(True)][..., 1:])
    return luma, chroma


@torch.no_grad()
def fuse_pair(model, path1, path2, device, max_memory=None):
    """Fuse two registered image files. ``max_memory``: bytes the network may use (None: what is
    available); a larger image is fused exactly from tiles (``utils.tiled``).

    Returns ``(grey, rgb)``: the fused Y as uint8 ``(H,W)`` and, when a source has colour, the
    colour result as uint8 ``(H,W,3)`` (else None).
    """
    luma, chroma = source_planes(path1, path2)
    height, width = luma.shape[1:]
    try:
        fused = tiled.fuse(model, torch.from_numpy(luma)[None].to(device), max_memory)
    except (MemoryError, RuntimeError) as error:
        if not isinstance(error, MemoryError) and "out of memory" not in str(error).lower() \
                and "can't allocate memory" not in str(error):
            raise
        raise FusionOutOfMemory(f"out of memory fusing {width}x{height} on {device.type}; try a smaller "
                                f"--max_memory (e.g. 1GB) to fuse it in tiles") from None
    del luma
    fused = fused[0, 0].float().cpu().numpy()
    bounds = float(fused.min()), float(fused.max())
    grey = np.empty((height, width), np.uint8)
    rgb = None if chroma is None else np.empty((height, width, 3), np.uint8)
    for top in range(0, height, BAND_ROWS):
        band = slice(top, top + BAND_ROWS)
        grey255 = stretch(fused[band], bounds) * np.float32(255)
        grey[band] = to_uint8(grey255)
        if rgb is not None:
            rgb[band] = colourise(grey255, chroma[band])
    return grey, rgb
