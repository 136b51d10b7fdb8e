"""What P learns from the meta-objective alone, with F held at given weights (a diagnostic).

    python bench/lpn_probe.py --task MFIF --data data/MFIF_train.h5 --fusion models/ReFusion_MFIF.pth
    python bench/lpn_probe.py --task MFIF --data data/MFIF_train.h5 \\
        --fusion ../shared/reference/official_weights/ReFusion_MFIF.pth

Not training and nothing is saved: F stays at ``--fusion`` throughout. R is first fitted to F's
outputs (``--recon_steps`` Adam steps on the reconstruction loss, as stage 2 does); then a fresh
P takes ``--meta_pairs`` stage-1 meta pairs (``utils.meta.lpn_meta_gradient``; a normalised step
of ``--lpn_lr`` every ``--accumulation_steps`` pairs) while F and R stay fixed. Every
``--report`` pairs it prints what P proposes on test crops (``bench/lpn_report.py``'s summary),
above all how often its gradient weight favours the source with the larger Sobel gradient.
Run with a weak and a strong F, this separates "the reconstruction signal does not ask for
that" from "it does, once F is good enough".
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.lpn_report import proposal_summary, test_crops  # noqa: E402
from bench.quality_report import TEST_FOLDERS  # noqa: E402
from utils.errors import run_script  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, choices=sorted(TEST_FOLDERS))
    parser.add_argument("--data", required=True, help=".h5 from data/img2patch.py (training pairs)")
    parser.add_argument("--fusion", required=True, help="F's weights, held fixed")
    parser.add_argument("--recon_steps", type=int, default=1500)
    parser.add_argument("--meta_pairs", type=int, default=400)
    parser.add_argument("--accumulation_steps", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4, help="R's Adam rate and the virtual-step size")
    parser.add_argument("--lpn_lr", type=float, default=1.6e-3)
    parser.add_argument("--symmetric_lpn", type=int, default=1)
    parser.add_argument("--lpn_fusion_loss", type=int, default=0,
                        help="1: P also descends the inner fusion loss, as the release's code")
    parser.add_argument("--recon_dim", type=int, default=16, help="R's width (ReN's dim; a multiple of 8)")
    parser.add_argument("--recon_blocks", type=int, default=2, help="R's transformer blocks")
    parser.add_argument("--recon_c_int", type=float, default=1.0, help="reconstruction loss weights")
    parser.add_argument("--recon_c_grad", type=float, default=1.0)
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--report", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from ReFusion import LPN, ReFusion, ReN
    from utils.checkpoint import load_weights
    from utils.data import epoch_batches, load_pairs, make_batch
    from utils.losses import reconstruction_loss
    from utils.meta import (LossWeights, apply_normalised_step, exchange, lpn_meta_gradient,
                            reconstruction_targets)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    pairs = load_pairs(args.data)
    fusion = load_weights(ReFusion(), args.fusion)  # never stepped: only virtual steps are taken
    recon, lpn = ReN(dim=args.recon_dim, num_blocks=args.recon_blocks), LPN()
    crops = test_crops(args.task, 3, 256)
    crop_rng = torch.Generator().manual_seed(args.seed)
    batches = [b for epoch in range(1 + (args.recon_steps + args.meta_pairs) * args.batch_size // len(pairs))
               for b in epoch_batches(len(pairs), args.batch_size, args.seed, epoch)]

    def batch(k):
        return make_batch(pairs, batches[k], args.crop, crop_rng, torch.device("cpu"))

    started = time.time()
    optimiser = torch.optim.Adam(recon.parameters(), lr=args.lr)
    for k in range(args.recon_steps):
        sources = batch(k)
        with torch.no_grad():
            fused = fusion(exchange(sources))
        loss = reconstruction_loss(reconstruction_targets(sources), recon(fused),
                                   args.recon_c_int, args.recon_c_grad)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    print(f"R fitted to F's outputs: {args.recon_steps} steps, last loss {loss.item():.4f}, "
          f"{time.time() - started:.0f} s")

    names = TEST_FOLDERS[args.task]
    print(f"\n| meta pairs | order | w_int first: mean (sd) | w_grad first: mean (sd) | "
          f"w_grad on larger gradient | outer loss (mean since last row) |\n|---|---|---|---|---|---|")

    def report(done, outer):
        for order, row in zip((names, names[::-1]), proposal_summary(lpn, crops, bool(args.symmetric_lpn))):
            print(f"| {done} | {', '.join(order)} | {row['w_int'][0]:.3f} ({row['w_int'][1]:.3f}) | "
                  f"{row['w_grad'][0]:.3f} ({row['w_grad'][1]:.3f}) | {row['follows_gradient']:.2f} | "
                  f"{outer} |", flush=True)

    report(0, "-")
    weights = LossWeights(recon_int=args.recon_c_int, recon_grad=args.recon_c_grad,
                          symmetric_proposals=bool(args.symmetric_lpn),
                          lpn_fusion_loss=bool(args.lpn_fusion_loss))
    accumulated, outer_sum = None, 0.0
    first = args.recon_steps
    for k in range(args.meta_pairs):
        outer, grads = lpn_meta_gradient(fusion, recon, lpn, batch(first + k), batch(first + k + 1),
                                         args.lr, weights)
        accumulated = grads if accumulated is None else [a + g for a, g in zip(accumulated, grads)]
        if (k + 1) % args.accumulation_steps == 0:
            apply_normalised_step(lpn, accumulated, args.lpn_lr)
            accumulated = None
        outer_sum += outer.item()
        if (k + 1) % args.report == 0:
            report(k + 1, f"{outer_sum / args.report:.5f}")
            outer_sum = 0.0
    print(f"\n{time.time() - started:.0f} s in all")


if __name__ == "__main__":
    from utils.runtime import keep_freed_memory
    keep_freed_memory()
    sys.exit(run_script(main))
