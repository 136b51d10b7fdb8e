"""Training pairs: an h5 file from data/img2patch.py, or the release's folder layout.

Both load into memory as a uint8 tensor ``(N,2,P,P)`` (Y channels of the two sources).
Batches come from a per-epoch permutation seeded by (seed, epoch), so the data order is a
function of the epoch alone and a resumed run sees exactly the batches it would have seen.
"""
import os

import h5py
import numpy as np
import torch

from utils.errors import UserError
from utils.image import read_rgb, to_ycrcb


class DataError(UserError):
    """A training data set that is missing or malformed (one-line message)."""


def y_channel_uint8(rgb):
    """RGB float32 [0,255] -> rounded Y channel as uint8 ``(H,W)``."""
    return np.round(to_ycrcb(rgb)[..., 0]).astype(np.uint8)


def load_h5(path):
    try:
        with h5py.File(path, "r") as store:
            if "img1" not in store or "img2" not in store:
                raise DataError(f"{path} has no 'img1'/'img2' datasets (make it with data/img2patch.py)")
            first, second = store["img1"][...], store["img2"][...]
    except OSError as error:
        raise DataError(f"cannot read {path}: not an HDF5 file or corrupt ({error})") from None
    if (first.shape != second.shape or first.ndim != 4 or first.shape[1] != 1
            or first.shape[2] != first.shape[3]):
        raise DataError(f"{path}: img1 {first.shape} and img2 {second.shape} must both be N x 1 x P x P")
    if first.dtype != np.uint8 or second.dtype != np.uint8:
        # other dtypes have no agreed scale ([0,1] or [0,255]); guessing would train on wrong data
        raise DataError(f"{path}: img1/img2 are {first.dtype}/{second.dtype}, expected uint8 grey levels "
                        "0-255 (make it with data/img2patch.py)")
    return torch.from_numpy(np.concatenate([first, second], axis=1))


def load_release_folders(root):
    """The release's pre-processed layout: ``root/<number>/img_1.png`` and ``img_2.png``."""
    folders = sorted((d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))),
                     key=lambda d: (not d.isdigit(), int(d) if d.isdigit() else 0, d))
    pairs = []
    for name in folders:
        paths = [os.path.join(root, name, f"img_{i}.png") for i in (1, 2)]
        if not all(os.path.isfile(p) for p in paths):
            raise DataError(f"{os.path.join(root, name)} lacks img_1.png / img_2.png")
        pair = [y_channel_uint8(read_rgb(p)) for p in paths]
        if pair[0].shape != pair[1].shape:
            raise DataError(f"size mismatch in {os.path.join(root, name)}")
        pairs.append(np.stack(pair))
    if not pairs:
        raise DataError(f"no numbered sub-folders with img_1.png/img_2.png in {root}")
    if len({p.shape for p in pairs}) != 1:
        raise DataError(f"pairs in {root} differ in size; cut them into patches with data/img2patch.py")
    return torch.from_numpy(np.stack(pairs))


def load_pairs(path):
    """``(N,2,P,P)`` uint8 from an ``.h5`` file or a release-layout folder."""
    if not os.path.exists(path):
        raise DataError(f"training data not found: {path} (make an .h5 with data/img2patch.py)")
    pairs = load_release_folders(path) if os.path.isdir(path) else load_h5(path)
    if len(pairs) == 0:
        raise DataError(f"{path} holds no pairs")
    return pairs


def epoch_batches(count, batch_size, seed, epoch):
    """Index tensors of the epoch's full batches (a last incomplete batch is dropped)."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return [order[i:i + batch_size] for i in range(0, count - batch_size + 1, batch_size)]


def meta_pairs_per_epoch(rule, batch_count, cap):
    """Stage-1 pairs of an epoch of ``batch_count`` batches, at most ``cap`` (see ``meta_pair``)."""
    return min(cap, batch_count // 2 if rule == "release" else batch_count - 1)


def meta_pair(rule, pair):
    """Indices of the (inner, outer) batches of stage-1 pair ``pair`` in the epoch's batch order.
    ``release``: two fresh batches a pair, as the release's loop walks its shuffled loader;
    ``paper``: consecutive batches, each the outer of one pair and the inner of the next."""
    return (2 * pair, 2 * pair + 1) if rule == "release" else (pair, pair + 1)


def fusion_steps_per_epoch(count, batch_size, cap):
    """Stage-2 steps of an epoch: one pass of full batches, at most ``cap`` (0: no cap)."""
    full_pass = count // batch_size
    return full_pass if cap <= 0 else min(cap, full_pass)


def crop_window(size, crop, generator):
    """Row and column slices of one random ``crop`` window of a ``size`` patch (0: whole patch)."""
    if 0 < crop < size:
        top, left = torch.randint(0, size - crop + 1, (2,), generator=generator).tolist()
        return slice(top, top + crop), slice(left, left + crop)
    return slice(None), slice(None)


def make_batch(pairs, indices, window, device):
    """Float batch ``(B,2,h,w)`` in [0,1]: the patches ``indices`` cut to ``window``."""
    rows, cols = window
    return pairs[indices][..., rows, cols].to(device=device, dtype=torch.float32) / 255
