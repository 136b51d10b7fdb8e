"""Replay one epoch's loss learning (stage 1) of a training run and watch P move.

    python -m tools.diagnostics.meta_replay --run exp/IVIF_full_schedule --epoch 6 [--pairs 150]
        [--meta_rule release|paper] [--lpn_fusion_loss true] [--symmetric_lpn true]

Stage 1 changes only P; F and R stay as the previous epoch left them. So starting from the run's
``*_epoch<N-1>.pth`` weights (epoch 1: the seed's initial weights) and stepping through epoch N's
meta pairs with train.py's own ``Trainer.meta_round`` reproduces P's path through that epoch, and
``LPN_epoch<N>.pth`` at its end. Every ``--every`` pairs it prints, on ``--probe`` fixed training
patches, the first input's mean intensity and gradient weight in both source orders (a P that
weights by position moves both orders the same way) and the mean outer loss so far. Overriding
``--meta_rule``, ``--lpn_fusion_loss`` or ``--symmetric_lpn`` asks what that epoch would have done under the other
rule, from the same state and batches. Needs a run trained with ``--crop 0``: the crop windows of
a later epoch depend on every draw before it, which no file keeps.
"""
import argparse
import json
import os
import sys

from tools.diagnostics.lpn_report import proposal_summary, spread_patches
from utils.errors import UserError, run_script
from utils.tasks import TASKS


def load_run_config(run):
    """The run's config.json as train.py reads it on resume (keys added since it was written)."""
    from train import saved_config
    path = os.path.join(run, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"no config.json in {run}; is it a train.py run folder?")
    with open(path) as stream:
        return saved_config(json.load(stream))


def replay(trainer, epoch, pairs, every, probe, report):
    """Stage 1 of (1-based) ``epoch`` on ``trainer``'s networks, ``pairs`` meta pairs (0: all),
    calling ``report(pairs_done, proposal_summary_rows, mean_outer_loss)`` every ``every`` pairs
    and at the end. Returns (pairs replayed, pairs in the whole stage)."""
    from train import loss_weights_at, lr_at
    from utils.data import epoch_batches, meta_pairs_per_epoch
    config = trainer.config
    trainer.epoch, trainer.stage, trainer.step = epoch - 1, "meta", 0
    trainer.lpn_update.pending = None
    batches = epoch_batches(len(trainer.pairs), config["batch_size"], config["seed"], epoch - 1)
    stage = meta_pairs_per_epoch(config["meta_rule"], len(batches), config["max_meta_step"])
    target = min(pairs, stage) if pairs else stage
    rate, lpn_rate = lr_at(config, epoch - 1), lr_at(config, epoch - 1, "lpn_lr")
    weights = loss_weights_at(config, epoch - 1)

    def show():
        loss = trainer.sums["meta"] / max(trainer.sums["meta_n"], 1)
        report(trainer.step, proposal_summary(trainer.lpn, probe, config["symmetric_lpn"]), loss)

    show()
    while trainer.step < target:
        trainer.meta_round(batches, stage, rate, lpn_rate, weights)
        if trainer.step % every == 0 or trainer.step == target:
            show()
    return target, stage


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="training run folder (config.json, *_epoch<N>.pth)")
    parser.add_argument("--epoch", type=int, required=True, help="the epoch whose stage 1 is replayed (1-based)")
    parser.add_argument("--pairs", type=int, default=0, help="meta pairs to replay (0: the whole stage)")
    parser.add_argument("--every", type=int, default=50, help="report every this many pairs")
    parser.add_argument("--probe", type=int, default=16, help="training patches P's weights are read on")
    parser.add_argument("--meta_rule", choices=("release", "paper"), help="override the run's rule")
    parser.add_argument("--lpn_fusion_loss", choices=("true", "false"), help="override the run's setting")
    parser.add_argument("--symmetric_lpn", choices=("true", "false"), help="override the run's setting")
    parser.add_argument("--data", help="training data (default: the run's config.json)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.epoch < 1 or args.pairs < 0 or args.every < 1 or args.probe < 1:
        raise UserError("--epoch, --every and --probe must be at least 1, --pairs at least 0")
    if not os.path.isdir(args.run):
        raise UserError(f"no training run folder {args.run}")
    config = load_run_config(args.run)
    if config.get("crop", 0):
        raise UserError(f"{args.run} was trained with --crop {config['crop']}: its crop windows "
                        f"cannot be replayed (only --crop 0 runs can)")
    if not 1 <= args.epoch <= config["epochs"]:
        raise UserError(f"--epoch must be between 1 and the run's {config['epochs']} epochs")
    start = {name: os.path.join(args.run, f"{name}_epoch{args.epoch - 1}.pth")
             for name in ("ReFusion", "ReN", "LPN")}
    if args.epoch > 1:
        for path in start.values():
            if not os.path.isfile(path):
                raise UserError(f"missing {path}: replaying epoch {args.epoch} starts from the "
                                f"weights epoch {args.epoch - 1} left")
    overrides = {key: getattr(args, key) == "true" for key in ("lpn_fusion_loss", "symmetric_lpn")
                 if getattr(args, key) is not None}
    if args.meta_rule:
        overrides["meta_rule"] = args.meta_rule
    config.update(overrides, device=args.device, threads=args.threads)
    if args.data:
        config["data"] = args.data

    from train import Trainer
    from utils.checkpoint import load_weights
    trainer = Trainer(config)
    if args.epoch > 1:
        for net, name in ((trainer.fusion, "ReFusion"), (trainer.recon, "ReN"), (trainer.lpn, "LPN")):
            load_weights(net, start[name])
    probe = spread_patches(trainer.pairs, args.probe).to(trainer.device)
    names = TASKS[config["task"]].dataset if config.get("task") in TASKS else ("A", "B")
    changed = ", ".join(f"{k} {v}" for k, v in overrides.items()) or "none"
    print(f"stage 1 of epoch {args.epoch} of {args.run} (overrides: {changed}); "
          f"P's first-input weights on {len(probe)} training patches\n")
    print("| pairs | order | w_int first: mean (sd) | w_grad first: mean (sd) | mean outer loss |")
    print("|---|---|---|---|---|")

    def report(done, rows, loss):
        for order, row in zip((names, names[::-1]), rows):
            print(f"| {done} | {', '.join(order)} | {row['w_int'][0]:.3f} ({row['w_int'][1]:.3f}) | "
                  f"{row['w_grad'][0]:.3f} ({row['w_grad'][1]:.3f}) | {loss:.4f} |", flush=True)

    done, stage = replay(trainer, args.epoch, args.pairs, args.every, probe, report)
    recorded = os.path.join(args.run, f"LPN_epoch{args.epoch}.pth")
    if done == stage and not overrides and os.path.isfile(recorded):
        saved = load_weights(type(trainer.lpn)(), recorded)
        gap = max((a - b.to(a)).abs().max().item()
                  for a, b in zip(trainer.lpn.state_dict().values(), saved.state_dict().values()))
        print(f"\nP after the whole stage against {recorded}: max |difference| {gap:.3g}")


if __name__ == "__main__":
    sys.exit(run_script(main))
