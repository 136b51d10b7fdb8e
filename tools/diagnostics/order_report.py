"""How much a training run's fusion module F depends on the order of its two inputs, epoch by epoch.

    python -m tools.diagnostics.order_report --run exp/IVIF/<run> --task IVIF --datasets DATASETS \
        [--reference NAME=WEIGHTS ...] [--data data/<train>.h5 --pairs 32]

Training shows F every pair in both orders, so F should give nearly the same image either way;
the released IVIF weights do (mean |F(a,b) - F(b,a)| of 0.018 on [0,1] images). An F whose loss
proposals weighted the sources by position learns to copy whichever source comes first or second,
and its output then follows that input in both orders. For each ``ReFusion_epoch<N>.pth`` (and
each ``--reference``) this prints, on the same test crops as ``lpn_report``, the mean absolute
difference between the two orders' outputs and the correlation of each order's output with each
source. ``--data`` reads them on training patches instead (``lpn_report``'s option): an F that
is order-invariant on its own domain and not on the test split fails to transfer, it has not
collapsed.
"""
import argparse
import os
import sys

from tools.diagnostics.lpn_report import add_probe_arguments, probe_pairs
from tools.score_run import finished_epochs
from utils.errors import run_script
from utils.tasks import TASKS


def correlation(a, b):
    """Mean over the batch of the per-image Pearson correlation of ``(N,1,H,W)`` images."""
    a = (a - a.mean(dim=(1, 2, 3), keepdim=True)).flatten(1)
    b = (b - b.mean(dim=(1, 2, 3), keepdim=True)).flatten(1)
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)).mean().item()


def order_dependence(fusion, pairs):
    """F on ``pairs`` ``(N,2,H,W)`` as given and swapped: ``{"difference": mean |F(a,b) - F(b,a)|,
    "given": (corr(F(a,b), a), corr(F(a,b), b)), "swapped": (corr(F(b,a), a), corr(F(b,a), b))}``."""
    import torch
    with torch.no_grad():
        given, swapped = fusion(pairs), fusion(pairs.flip(1))
    first, second = pairs[:, :1], pairs[:, 1:]
    return {"difference": (given - swapped).abs().mean().item(),
            "given": (correlation(given, first), correlation(given, second)),
            "swapped": (correlation(swapped, first), correlation(swapped, second))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="training run folder with ReFusion_epoch<N>.pth")
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    parser.add_argument("--reference", action="append", default=[], metavar="NAME=WEIGHTS",
                        help="also report these weights (e.g. released=path/to/ReFusion_IVIF.pth)")
    add_probe_arguments(parser, 8)
    args = parser.parse_args()

    from ReFusion import ReFusion
    from utils.checkpoint import load_weights

    if not os.path.isdir(args.run):
        sys.exit(f"error: no training run folder {args.run}")
    rows = []
    for item in args.reference:
        name, _, path = item.partition("=")
        if not path:
            sys.exit(f"error: --reference takes NAME=WEIGHTS, got {item!r}")
        rows.append((name, path))
    rows += [(f"epoch {e}", os.path.join(args.run, f"ReFusion_epoch{e}.pth"))
             for e in finished_epochs(args.run)]
    if not rows:
        sys.exit(f"error: no ReFusion_epoch<N>.pth in {args.run}")
    pairs, where = probe_pairs(args)
    a, b = TASKS[args.task].dataset
    print(f"F on {where}, inputs ({a}, {b}) and ({b}, {a})\n")
    print(f"| weights | mean abs difference of the two orders | corr(F({a},{b}), {a} / {b}) "
          f"| corr(F({b},{a}), {a} / {b}) |")
    print("|---|---|---|---|")
    for name, path in rows:
        report = order_dependence(load_weights(ReFusion().eval(), path), pairs)
        print(f"| {name} | {report['difference']:.4f} | {report['given'][0]:.3f} / {report['given'][1]:.3f} "
              f"| {report['swapped'][0]:.3f} / {report['swapped'][1]:.3f} |")


if __name__ == "__main__":
    sys.exit(run_script(main))
