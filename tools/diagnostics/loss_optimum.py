"""The fusion loss's own optimum: are its borders striped before any network is trained?

    python -m tools.diagnostics.loss_optimum --data data/IVIF_MSRS_train.h5 [--pairs 8]

For training patches spread over ``--data`` this minimises ``utils.losses.fusion_loss`` over the
fused image itself (L-BFGS, no network), under each gradient term and Sobel padding, with fixed
intensity weights: equal, or 0.8 on the brighter or on the darker source per pixel. It prints
``border_alternation`` of each optimum (``tools/diagnostics/stripes.py``) and its outer rows'
mean grey levels. A striped optimum means the loss itself asks for stripes, whatever P proposes
(docs/STUDIES.md, "Border stripes").
"""
import argparse
import sys

import numpy as np
import torch

from tools.diagnostics.stripes import BORDER_LINES, border_alternation
from utils.errors import UserError, run_script
from utils.losses import GRADIENT_TARGETS, PADDINGS, fusion_loss

WEIGHTINGS = ("equal", "0.8 on brighter", "0.8 on darker")


def intensity_weights(sources, weighting):
    """``(B,2,H,W)`` per-pixel intensity weights of the two sources for a ``WEIGHTINGS`` entry."""
    if weighting == "equal":
        return torch.full_like(sources, 0.5)
    first_brighter = (sources[:, :1] >= sources[:, 1:]).float()
    on_brighter = torch.cat([first_brighter, 1 - first_brighter], 1) * 0.6 + 0.2
    return on_brighter if weighting == "0.8 on brighter" else 1 - on_brighter


def loss_optimum(sources, w_int, gradient_target, padding, iterations=2000):
    """The fused image ``(B,H,W)`` in grey levels that minimises the fusion loss (c_int = c_grad
    = 1) for ``sources`` ``(B,2,H,W)`` in [0,1]; P's gradient weights, where the term uses them,
    equal ``w_int``."""
    fused = sources.mean(dim=1, keepdim=True).clone().requires_grad_(True)
    optimiser = torch.optim.LBFGS([fused], max_iter=iterations, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        optimiser.zero_grad()
        loss = fusion_loss(sources, fused, w_int, w_int, 1.0, 1.0, padding, gradient_target)
        loss.backward()
        return loss

    optimiser.step(closure)
    return fused.detach()[:, 0] * 255


def optimum_table(sources, iterations=2000):
    """``[(gradient term, padding, weighting, mean stripes, max stripes, outer rows' means)]``."""
    rows = []
    for target in GRADIENT_TARGETS:
        for padding in PADDINGS:
            for weighting in WEIGHTINGS:
                fused = loss_optimum(sources, intensity_weights(sources, weighting), target, padding, iterations)
                depths = [border_alternation(image.numpy()) for image in fused]
                outer = fused[:, :BORDER_LINES].mean(dim=(0, 2)).numpy()
                rows.append((target, padding, weighting, float(np.mean(depths)), float(np.max(depths)), outer))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="training patches (.h5 or release-layout folder)")
    parser.add_argument("--pairs", type=int, default=8, help="patch pairs, spread evenly over the file")
    parser.add_argument("--iterations", type=int, default=2000, help="L-BFGS iterations")
    args = parser.parse_args()
    if args.pairs < 1 or args.iterations < 1:
        raise UserError("--pairs and --iterations must be at least 1")

    from utils.data import load_pairs
    pairs = load_pairs(args.data)
    chosen = np.unique(np.linspace(0, len(pairs) - 1, args.pairs).round().astype(int))
    sources = torch.from_numpy(np.stack([np.asarray(pairs[int(i)]) for i in chosen])).float() / 255
    print(f"the fusion loss's optimum on {len(chosen)} patches of {args.data}: border alternation "
          f"(grey levels, outer {BORDER_LINES} lines)\n")
    print("| gradient term | padding | intensity weights | stripes: mean | max | top rows' mean grey level |")
    print("|---|---|---|---|---|---|")
    for target, padding, weighting, mean, largest, outer in optimum_table(sources, args.iterations):
        levels = " / ".join(f"{level:.1f}" for level in outer)
        print(f"| {target} | {padding} | {weighting} | {mean:.1f} | {largest:.1f} | {levels} |")


if __name__ == "__main__":
    sys.exit(run_script(main))
