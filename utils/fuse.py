"""The inference pipeline: a pair of image files -> fused grey (and colour) images."""
import numpy as np
import torch

from utils.image import ImageError, colourise, output_chroma, read_rgb, stretch, to_uint8, to_ycrcb


def read_pair(path1, path2):
    """Both sources as RGB float32 [0,255]; an error naming the pair if the sizes differ."""
    rgb1, rgb2 = read_rgb(path1), read_rgb(path2)
    if rgb1.shape != rgb2.shape:
        raise ImageError(f"size mismatch: {path1} is {rgb1.shape[1]}x{rgb1.shape[0]} but "
                         f"{path2} is {rgb2.shape[1]}x{rgb2.shape[0]} (sources must be registered)")
    return rgb1, rgb2


def luma_batch(ycrcb1, ycrcb2):
    """The networks' input from two YCrCb [0,255] images: ``(1,2,H,W)`` float32 Y in [0,1]."""
    return torch.from_numpy(np.stack([ycrcb1[..., 0], ycrcb2[..., 0]])[None] / np.float32(255))


@torch.no_grad()
def fuse_rgb(model, rgb1, rgb2, device, max_memory=None):
    """Fuse two registered RGB float32 [0,255] images.

    ``max_memory``: bytes the network's forward may use (None: what is available); a larger image
    is fused exactly from tiles (``utils.tiled``). Returns ``(grey, rgb)``: the fused Y as uint8
    ``(H,W)`` and, when a source has colour, the colour result as uint8 ``(H,W,3)`` (else None).
    """
    from utils.tiled import fuse
    ycrcb1, ycrcb2 = to_ycrcb(rgb1), to_ycrcb(rgb2)
    fused = fuse(model, luma_batch(ycrcb1, ycrcb2).to(device), max_memory)[0, 0].float().cpu().numpy()
    grey255 = stretch(fused) * np.float32(255)
    chroma = output_chroma(rgb1, rgb2, ycrcb1, ycrcb2)
    return to_uint8(grey255), (None if chroma is None else colourise(grey255, chroma))
