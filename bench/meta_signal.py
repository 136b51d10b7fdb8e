"""Whether P's meta-gradient still has a direction after a training run's epochs (a diagnostic).

    python bench/meta_signal.py --run exp/MIF/<run> --epochs 1 2 3

For each epoch N it loads F, R and P as the run saved them after epoch N and takes ``--pairs``
stage-1 meta-gradients of P (``utils.meta.lpn_meta_gradient``, with the loss weights and rate
epoch N+1 would use) on consecutive pairs of training batches, stepping nothing. It prints how
aligned single pairs' gradients are (mean |cos| and mean cos over all pairs of pairs) and the
cosine between the mean gradients of four disjoint groups of pairs. Near 1: P has a consistent
direction to move in. Near 0 or scattered: the per-pair gradients cancel, and P's normalised steps
(``lr * g / max|g|``, the same size whatever ``g``) now walk at random, by ``--lpn_lr`` each.
"""
import argparse
import itertools
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from utils.errors import UserError, run_script  # noqa: E402

GROUPS = 4


def gradient_rows(run, config, epoch, pairs, batch_size, seed):
    """``(pairs, n)``: P's flattened meta-gradient for each of ``pairs`` batch pairs."""
    import torch

    from ReFusion import LPN, ReFusion, ReN
    from utils.checkpoint import load_weights
    from utils.data import epoch_batches, load_pairs, make_batch
    from train import loss_weights_at, lr_at
    from utils.meta import lpn_meta_gradient

    def saved(network, name):
        return load_weights(network, os.path.join(run, f"{name}_epoch{epoch}.pth"))

    fusion, lpn = saved(ReFusion(), "ReFusion"), saved(LPN(), "LPN")
    recon = saved(ReN(dim=config["recon_dim"], num_blocks=config["recon_blocks"]), "ReN")
    c = config
    weights, rate = loss_weights_at(c, epoch), lr_at(c, epoch)  # epoch N+1's (0-based index N)
    data = load_pairs(c["data"])
    order = epoch_batches(len(data), batch_size, seed, 0)
    if len(order) < 2 * pairs:
        raise UserError(f"{c['data']} has {len(order)} batches; --pairs {pairs} needs {2 * pairs}")
    crop_rng = torch.Generator().manual_seed(seed)

    def batch(k):
        return make_batch(data, order[k], c["crop"], crop_rng, torch.device("cpu"))

    return torch.stack([torch.cat([g.flatten() for g in lpn_meta_gradient(
        fusion, recon, lpn, batch(2 * k), batch(2 * k + 1), rate, weights)[1]]) for k in range(pairs)])


def agreement(rows):
    """(mean |cos|, mean cos) over all pairs of rows, and the cosines between group means."""
    import torch

    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-30)
    cosines = (unit @ unit.T)[~torch.eye(len(rows), dtype=torch.bool)]
    means = rows[:len(rows) // GROUPS * GROUPS].reshape(GROUPS, len(rows) // GROUPS, -1).mean(1)
    between = [torch.nn.functional.cosine_similarity(a, b, dim=0).item()
               for a, b in itertools.combinations(means, 2)]
    return cosines.abs().mean().item(), cosines.mean().item(), between


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a train.py run folder (config.json, *_epoch<N>.pth)")
    parser.add_argument("--epochs", type=int, nargs="+", required=True)
    parser.add_argument("--pairs", type=int, default=48, help=f"meta pairs per epoch (>= {2 * GROUPS})")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="which training batches and crops")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.pairs < 2 * GROUPS:
        raise UserError(f"--pairs must be at least {2 * GROUPS}")
    config_path = os.path.join(args.run, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"not a train.py run folder (no config.json): {args.run}")
    with open(config_path) as f:
        config = json.load(f)

    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    size = args.pairs // GROUPS
    print(f"| after epoch | per-pair mean abs cos | per-pair mean cos | cos between means of {GROUPS} "
          f"groups of {size}: mean (min, max) |\n|---|---|---|---|")
    for epoch in args.epochs:
        rows = gradient_rows(args.run, config, epoch, args.pairs, args.batch_size, args.seed)
        abs_cos, cos, between = agreement(rows)
        print(f"| {epoch} | {abs_cos:.2f} | {cos:+.3f} | {sum(between) / len(between):+.3f} "
              f"({min(between):+.2f}, {max(between):+.2f}) |", flush=True)


if __name__ == "__main__":
    from utils.runtime import keep_freed_memory
    keep_freed_memory()
    sys.exit(run_script(main))
