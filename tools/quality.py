"""Fuse a dataset's test split with one weights file and score it with eval.py's metrics."""
import os
import tempfile

SHOWN = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM")


def test_split(datasets, task):
    """``(img1 folder, img2 folder)`` of ``<datasets>/<TASK>/test``."""
    from utils.tasks import TASKS
    return tuple(os.path.join(datasets, task, "test", folder) for folder in TASKS[task].dataset)


def fuse_folder(weights, img1, img2, out, stems=None, device="auto"):
    """What ``test.py --model weights`` writes to ``<out>/Gray``, for the pairs in ``stems``
    (all when None). Returns the number of pairs fused."""
    from ReFusion import ReFusion
    from utils.checkpoint import load_weights
    from utils.fuse import fuse_pair
    from utils.image import pair_images, write_png
    from utils.runtime import resolve_device

    target = resolve_device(device)
    model = load_weights(ReFusion(), weights).to(target).eval()
    pairs = [p for p in pair_images(img1, img2) if stems is None or p[0] in stems]
    for stem, path1, path2 in pairs:
        grey, _ = fuse_pair(model, path1, path2, target)
        write_png(os.path.join(out, "Gray", f"{stem}.png"), grey)
    return len(pairs)


def score_weights(weights, img1, img2, stems=None, device="auto"):
    """``(pairs, {metric: mean})`` of ``weights`` on the pairs of two source folders."""
    from eval import mean_row, score_folders
    with tempfile.TemporaryDirectory() as work:
        fuse_folder(weights, img1, img2, work, stems, device)
        rows = score_folders(img1, img2, os.path.join(work, "Gray"))
    return len(rows), mean_row(rows)
