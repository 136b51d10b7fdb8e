"""Striped borders: how much F's outer rows and columns alternate in brightness.

    python -m tools.diagnostics.stripes --task IVIF NAME=WEIGHTS [NAME=WEIGHTS ...] \
        [--img1 A --img2 B ...] [--run exp/<run>]

A model trained with zero-padded Sobel maps in its loss (the release's) can learn borders whose
lines alternate, bright and dark, when P's intensity and gradient weights favour different sources
there (docs/STUDIES.md, "Border stripes"). For every pair (the bundled ``test_cases/<TASK>`` unless
``--img1``/``--img2`` name others) and every model (each NAME=WEIGHTS, and every
``ReFusion_epoch<N>.pth`` of ``--run``) this prints ``border_alternation`` of F's raw output:
how deep the deepest zig-zag of mean grey level runs among the outer five rows or columns of any
side.
"""
import argparse
import os
import sys

import numpy as np

from utils.errors import UserError, run_script
from utils.tasks import TASKS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BORDER_LINES = 5


def border_alternation(image, lines=BORDER_LINES):
    """How far any of the outer ``lines`` rows or columns of ``image`` ``(H,W)`` stands out from
    both its neighbours in the same direction, in grey levels: for line ``i`` with mean ``m_i``,
    ``min(|m_i - m_i-1|, |m_i - m_i+1|)`` where ``m_i`` is above or below both (else 0), the
    largest over the four sides. A stripe scores its depth; a border that brightens or darkens
    steadily toward the edge scores 0, as does anything further in."""
    image = np.asarray(image, np.float64)
    depth = 0.0
    for plane in (image, image.T):  # rows, then columns
        for side in (plane[:lines + 1], plane[::-1][:lines + 1]):
            means = side.mean(axis=1)
            above, below = means[1:-1] - means[:-2], means[1:-1] - means[2:]
            extremum = np.where(above * below > 0, np.minimum(np.abs(above), np.abs(below)), 0.0)
            depth = max(depth, extremum.max())
    return depth


def fused_grey(fusion, path1, path2):
    """F's raw output on the pair's Y channels, ``(H,W)`` grey levels in [0,255] (not stretched,
    unlike ``test.py``'s images, so that levels compare across models)."""
    import torch

    from utils.fuse import source_planes
    luma, _ = source_planes(path1, path2)
    with torch.no_grad():
        return fusion(torch.from_numpy(luma)[None])[0, 0].numpy() * 255


def bundled_pairs(task):
    """``[(name, path1, path2)]`` of ``test_cases/<task>``, paired by file stem."""
    from utils.image import pair_images
    return pair_images(*(os.path.join(ROOT, "test_cases", task, folder) for folder in TASKS[task].test_cases))


def alternation_table(models, pairs):
    """``{model name: {pair name: border_alternation}}`` for ``models`` ``[(name, weights path)]``."""
    from ReFusion import ReFusion
    from utils.checkpoint import load_weights
    table = {}
    for name, path in models:
        fusion = load_weights(ReFusion().eval(), path)
        table[name] = {pair: border_alternation(fused_grey(fusion, a, b)) for pair, a, b in pairs}
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", metavar="NAME=WEIGHTS")
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--img1", nargs="*", default=[], help="first sources (default: the bundled cases)")
    parser.add_argument("--img2", nargs="*", default=[], help="second sources, in the same order")
    parser.add_argument("--run", default="", help="also every ReFusion_epoch<N>.pth of this run folder")
    args = parser.parse_args()

    from tools.score_run import finished_epochs

    models = []
    for item in args.models:
        name, _, path = item.partition("=")
        if not path:
            raise UserError(f"models are given as NAME=WEIGHTS, got {item!r}")
        models.append((name, path))
    if args.run:
        if not os.path.isdir(args.run):
            raise UserError(f"no training run folder {args.run}")
        models += [(f"epoch {e}", os.path.join(args.run, f"ReFusion_epoch{e}.pth"))
                   for e in finished_epochs(args.run)]
    if not models:
        raise UserError("name at least one NAME=WEIGHTS or a --run with finished epochs")
    if len(args.img1) != len(args.img2):
        raise UserError(f"--img1 names {len(args.img1)} files but --img2 {len(args.img2)}")
    from utils.image import pair_images
    pairs = [pair for a, b in zip(args.img1, args.img2) for pair in pair_images(a, b)] or bundled_pairs(args.task)
    table = alternation_table(models, pairs)
    print(f"border alternation (grey levels, outer {BORDER_LINES} lines) of F's raw output, {args.task}\n")
    print("| weights | " + " | ".join(name for name, _, _ in pairs) + " |")
    print("|---|" + "---|" * len(pairs))
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[pair]:.1f}" for pair, _, _ in pairs) + " |")


if __name__ == "__main__":
    sys.exit(run_script(main))
