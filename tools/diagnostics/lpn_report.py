"""What a training run's loss proposal module P asks for, epoch by epoch.

    python -m tools.diagnostics.lpn_report --run exp/IVIF/<run> --task IVIF --datasets DATASETS
    python -m tools.diagnostics.lpn_report --run exp/IVIF/<run> --task IVIF --data data/<train>.h5 --pairs 32

P's per-pixel weights define F's loss. Nearly flat weights (0.5 everywhere) ask F for the mean
of the two sources and of their gradients; a P that weights by position rather than content gives
the first input the same weight whichever source it is. For each ``LPN_epoch<N>.pth`` this prints,
on the first ``--pairs`` pairs of ``<DATASETS>/<TASK>/test`` (a ``--size`` crop of each, Y channel), the mean and per-pixel
standard deviation of the first input's intensity and gradient weights in both source orders
(averaged over the orders when the run used ``--symmetric_lpn``),
and how often the gradient weight favours the source with the larger Sobel gradient (over the
pixels where the two gradients differ), and P's largest parameter change since the previous
epoch: P steps at most its rate per update, so that change against (updates x rate) tells whether
its updates add up or cancel.

``--data`` reads the same figures on ``--pairs`` patches spread over a training ``.h5`` instead:
the domain the run learned on. A P that weights by content there but by position on the test
split has not collapsed; it transfers by position to data unlike its own.
"""
import argparse
import json
import os
import sys

from tools.quality import test_split
from tools.score_run import finished_epochs
from utils.errors import UserError, run_script
from utils.tasks import TASKS


def test_crops(datasets, task, count, size):
    """``(count,2,size,size)``: top-left crops of the first ``count`` test pairs (Y, [0,1])."""
    import torch

    from utils.fuse import luma_batch, read_pair
    from utils.image import pair_images, to_ycrcb
    first, second = test_split(datasets, task)
    if not os.path.isdir(first):
        sys.exit(f"error: no test split at {first}")
    crops = []
    for _, path1, path2 in pair_images(first, second)[:count]:
        rgb1, rgb2 = read_pair(path1, path2)
        crops.append(luma_batch(to_ycrcb(rgb1), to_ycrcb(rgb2))[..., :size, :size])
    return torch.cat(crops)


def spread_patches(pairs, count):
    """``(count,2,P,P)`` in [0,1]: ``count`` of the uint8 training ``pairs`` at even index steps."""
    import torch
    spread = torch.linspace(0, len(pairs) - 1, min(count, len(pairs))).long()
    return pairs[spread].float() / 255


def probe_pairs(args):
    """The pairs a report reads its networks on: ``--pairs`` training patches of ``--data`` when
    given, else ``--pairs`` test crops of ``--size`` px from ``--datasets``, and their description."""
    if args.data:
        from utils.data import load_pairs
        pairs = spread_patches(load_pairs(args.data), args.pairs)
        return pairs, f"{len(pairs)} training patches of {args.data}"
    if not args.datasets:
        raise UserError("give --datasets (the test split) or --data (a training .h5)")
    pairs = test_crops(args.datasets, args.task, args.pairs, args.size)
    return pairs, f"{len(pairs)} test crops of {args.size} px"


def add_probe_arguments(parser, pairs):
    parser.add_argument("--datasets", help="folder holding <TASK>/test/: read the test split")
    parser.add_argument("--data", help="a training .h5 instead: read the run's own domain")
    parser.add_argument("--pairs", type=int, default=pairs, help="test pairs or training patches")
    parser.add_argument("--size", type=int, default=256, help="test crop size")


def proposal_summary(lpn, pairs, symmetric):
    """P's weights on ``pairs`` in both source orders: per order, the first input's intensity and
    gradient weights as (mean, sd) and the share of pixels (where the two Sobel gradients differ)
    at which the gradient weight favours the source with the larger gradient."""
    import torch

    from utils.losses import gradient_map
    from utils.meta import exchange
    with torch.no_grad():
        w_ints, w_grads = lpn(exchange(pairs), exchanged=symmetric)
    rows = []
    for x, w_int, w_grad in zip(exchange(pairs).chunk(2), w_ints.chunk(2), w_grads.chunk(2)):
        grad_first, grad_second = gradient_map(x[:, :1]), gradient_map(x[:, 1:])
        differ = grad_first != grad_second  # ties (flat background) favour neither source
        agrees = ((w_grad[:, :1] > 0.5) == (grad_first > grad_second))[differ].float().mean()
        rows.append({"w_int": (w_int[:, 0].mean().item(), w_int[:, 0].std().item()),
                     "w_grad": (w_grad[:, 0].mean().item(), w_grad[:, 0].std().item()),
                     "follows_gradient": agrees.item()})
    return rows


def largest_change(before, after):
    """max |phi_after - phi_before| over all of P's parameters."""
    return max((a - b).abs().max().item() for a, b in zip(after.parameters(), before.parameters()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="training run folder with LPN_epoch<N>.pth")
    parser.add_argument("--task", required=True, choices=sorted(TASKS))
    add_probe_arguments(parser, 3)
    args = parser.parse_args()

    from ReFusion import LPN
    from utils.checkpoint import load_weights

    if not os.path.isdir(args.run):
        sys.exit(f"error: no training run folder {args.run}")
    pairs, where = probe_pairs(args)
    names = TASKS[args.task].dataset
    epochs = finished_epochs(args.run, "LPN")
    if not epochs:
        sys.exit(f"error: no LPN_epoch<N>.pth in {args.run}")
    config_path = os.path.join(args.run, "config.json")
    config = {}
    if os.path.isfile(config_path):
        with open(config_path) as stream:
            config = json.load(stream)
    symmetric = config.get("symmetric_lpn", False)
    print(f"P's weights as the run used them (symmetric_lpn {symmetric}) on {where}\n")
    if config.get("gradient_target") == "max":
        print("The run's gradient term was unweighted (--gradient_target max): P's w_grad columns "
              "are outputs no loss used.\n")
    print("| epoch | order | w_int first: mean (sd) | w_grad first: mean (sd) "
          "| w_grad on larger gradient (where they differ) | max abs change of P since previous epoch |")
    print("|---|---|---|---|---|---|")
    previous = None
    for epoch in epochs:
        lpn = load_weights(LPN(), os.path.join(args.run, f"LPN_epoch{epoch}.pth"))
        change = "" if previous is None or previous[0] != epoch - 1 else f"{largest_change(previous[1], lpn):.5f}"
        for order, row in zip((names, names[::-1]), proposal_summary(lpn, pairs, symmetric)):
            print(f"| {epoch} | {', '.join(order)} | {row['w_int'][0]:.3f} ({row['w_int'][1]:.3f}) | "
                  f"{row['w_grad'][0]:.3f} ({row['w_grad'][1]:.3f}) | {row['follows_gradient']:.2f} | {change} |")
        previous = epoch, lpn


if __name__ == "__main__":
    sys.exit(run_script(main))
