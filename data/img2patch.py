"""Cut registered image pairs into training patches stored in one .h5 file.

    python data/img2patch.py --img1 DATASETS/IVIF/train/ir --img2 DATASETS/IVIF/train/vi \
        --out data/IVIF_train.h5 --patch_size 128 --stride 64

Output: datasets ``img1`` and ``img2`` (uint8, N x 1 x P x P, Y channel of each source) and
attributes ``source1``, ``source2``, ``patch_size``, ``stride``, ``low_contrast``, ``count``,
``images``, ``dropped``. Every pair is checked (decodable, same size) before any patch is cut; a bad pair is named and
nothing is written. Patches of low contrast in either source are dropped: ``absolute``, a
10th-90th percentile range under 10% of 0-255; ``relative``, under 10% of the 90th percentile
(CDDFuse's rule, from the release's group), which keeps dark but structured night scenes such as
most of MSRS.
"""
import argparse
import os
import sys

# -----------------------------------------------------------------------------
# Edit these, or override them on the command line (python data/img2patch.py --help).
path_img1 = ""        # folder of first sources (e.g. infrared), paired with path_img2 by file name
path_img2 = ""        # folder of second sources (e.g. visible)
path_out = "data/IVIF_train.h5"
patch_size = 128
stride = 64
low_contrast = "absolute"  # "absolute" | "relative": which patches count as low-contrast (above)
# -----------------------------------------------------------------------------

# a script in data/ that imports the repository's utils
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def patches(image, size, step):
    """All ``size x size`` windows of a 2-D array at ``step`` pixels: ``(n, size, size)``."""
    from numpy.lib.stride_tricks import sliding_window_view
    return sliding_window_view(image, (size, size))[::step, ::step].reshape(-1, size, size)


CONTRAST_RULES = ("absolute", "relative")


def is_low_contrast(patch_stack, rule):
    """Per patch ``(n,P,P)`` uint8: True if its 10th-90th percentile range is under 10% of 255
    (``absolute``) or of its 90th percentile (``relative``)."""
    import numpy as np
    low, high = np.percentile(patch_stack.reshape(len(patch_stack), -1), [10, 90], axis=1)
    reference = 255.0 if rule == "absolute" else high
    return (high - low) < 0.1 * reference


def build(img1, img2, out, size, step, rule="absolute"):
    import io

    import h5py
    from tqdm import tqdm

    from utils.atomic import write_bytes_atomic
    from utils.data import y_channel_uint8
    from utils.errors import UserError
    from utils.fuse import read_pair
    from utils.image import pair_images

    if not img1 or not img2:
        raise UserError("--img1 and --img2 are needed: folders of the two sources, paired by file name")
    if rule not in CONTRAST_RULES:
        raise UserError(f"--low_contrast must be one of {', '.join(CONTRAST_RULES)}, got '{rule}'")
    if size < 8 or step < 1:
        raise UserError(f"--patch_size must be >= 8 and --stride >= 1 (got {size}, {step})")
    for folder in (img1, img2):
        if not os.path.isdir(folder):
            raise UserError(f"folder not found: {folder}")
    pairs = pair_images(img1, img2)
    if not pairs:
        raise UserError(f"no image pairs in {img1} and {img2}")
    if os.path.exists(out):
        raise UserError(f"{out} exists; delete it or choose another --out")
    bad = []
    for stem, path1, path2 in tqdm(pairs, desc="checking", unit="pair"):
        try:
            read_pair(path1, path2)  # decodable, same size (as test.py)
        except UserError as error:
            bad.append(f"{stem}: {error}")
    if bad:
        for line in bad[:-1]:
            print(f"error: {line}", file=sys.stderr)
        raise UserError(f"{bad[-1]}\n{len(bad)} of {len(pairs)} pairs cannot be used; nothing written "
                        f"(a training set that silently lacks pairs would change the experiment)")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    kept = dropped = used = 0
    # built in memory and written at once: a full disk is then one clear error, not a crash in HDF5
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as store:
        sets = [store.create_dataset(name, (0, 1, size, size), maxshape=(None, 1, size, size),
                                     dtype="uint8", chunks=(64, 1, size, size), compression="gzip")
                for name in ("img1", "img2")]
        for stem, path1, path2 in tqdm(pairs, desc="patches", unit="pair"):
            first, second = map(y_channel_uint8, read_pair(path1, path2))  # size check as test.py
            if min(first.shape) < size:
                tqdm.write(f"warning: {stem} is {first.shape[1]}x{first.shape[0]}, smaller than a "
                           f"{size}px patch; skipped")
                continue
            used += 1
            cuts1, cuts2 = patches(first, size, step), patches(second, size, step)
            keep = ~(is_low_contrast(cuts1, rule) | is_low_contrast(cuts2, rule))
            dropped += int((~keep).sum())
            for dataset, cuts in zip(sets, (cuts1[keep], cuts2[keep])):
                dataset.resize(kept + len(cuts), axis=0)
                dataset[kept:] = cuts[:, None]
            kept += int(keep.sum())
        store.attrs.update({"source1": os.path.abspath(img1), "source2": os.path.abspath(img2),
                            "patch_size": size, "stride": step, "low_contrast": rule, "count": kept, "images": used,
                            "dropped": dropped})
    if kept == 0:
        raise UserError("no patches kept (images too small or all low-contrast)")
    write_bytes_atomic(out, buffer.getvalue())
    print(f"{kept} patch pairs from {used} image pairs ({dropped} low-contrast dropped) -> {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Cut registered pairs into h5 training patches.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--img1", default=path_img1, help="folder of first sources (e.g. infrared)")
    parser.add_argument("--img2", default=path_img2, help="folder of second sources, paired by file name")
    parser.add_argument("--out", default=path_out, help="the .h5 file to write (never overwritten)")
    parser.add_argument("--patch_size", type=int, default=patch_size, help="patch side in pixels")
    parser.add_argument("--stride", type=int, default=stride, help="pixels between patches")
    parser.add_argument("--low_contrast", default=low_contrast, choices=CONTRAST_RULES,
                        help="absolute: drop patches whose 10th-90th percentile range is under 10%% of "
                             "0-255; relative: under 10%% of their 90th percentile (keeps dark scenes)")
    args = parser.parse_args(argv)
    from utils.errors import run_script
    return run_script(lambda: build(args.img1, args.img2, args.out, args.patch_size, args.stride,
                                    args.low_contrast),
                      "interrupted; no output written")


if __name__ == "__main__":
    sys.exit(main())
