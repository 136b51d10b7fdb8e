"""Train F on from one epoch of a run under the loss proposals of other epochs' P, and score each.

    python -m tools.diagnostics.lpn_swap --run exp/IVIF_full_schedule --epoch 8 --lpn 5 8 \
        --steps 400 --datasets DATASETS [--save DIR]

Whether a trend in a run's scores comes from P (the loss it proposes) or from F and its schedule
is a question of cause, which the scores of successive epochs cannot answer. This starts F and R
from ``ReFusion_epoch<N>.pth`` / ``ReN_epoch<N>.pth`` and, once for each ``--lpn M``, runs the
first ``--steps`` stage-2 steps of epoch N+1 (the batches, learning rate and loss weights
``train.py`` uses there) with P fixed at ``LPN_epoch<M>.pth``, then scores F on the task's test
split with ``eval.py``'s metrics. Every P sees the same batches from the same start, so the
differences between the rows are P's doing.

F's and R's optimiser states come from the run's ``checkpoint.pt`` when it stands in stage 1 of
epoch N+1 (stage 1 leaves them as epoch N did); otherwise Adam starts afresh, which the output
says. In a ``--crop 0`` run with the checkpoint's optimisers and ``--lpn N+1``, all steps end
exactly at ``ReFusion_epoch<N+1>.pth``; with crops, the windows are drawn from a fixed generator,
the same for every P but not the run's.
"""
import argparse
import os
import sys
import tempfile

from tools.diagnostics.meta_replay import load_run_config
from tools.quality import SHOWN, score_weights, test_split
from utils.errors import UserError, run_script


def optimiser_states(run, epoch):
    """``(opt_fusion, opt_recon)`` state dicts from ``run``'s checkpoint.pt when it stands in
    stage 1 of (1-based) epoch ``epoch + 1``, else None."""
    from utils.checkpoint import read_checkpoint
    path = os.path.join(run, "checkpoint.pt")
    if not os.path.isfile(path):
        return None
    state = read_checkpoint(path)
    if isinstance(state, dict) and state.get("epoch") == epoch and state.get("stage") == "meta":
        return state["opt_fusion"], state["opt_recon"]
    return None


def train_under(trainer, run, epoch, lpn_epoch, steps, optimisers):
    """F (and R) from the end of ``epoch`` stepped ``steps`` times through epoch ``epoch + 1``'s
    stage 2 with P fixed at ``LPN_epoch<lpn_epoch>.pth``. Returns F's mean fusion loss."""
    import torch

    from train import empty_sums, loss_weights_at, lr_at
    from utils.checkpoint import load_weights
    from utils.data import epoch_batches
    config = trainer.config
    for net, name in ((trainer.fusion, f"ReFusion_epoch{epoch}"), (trainer.recon, f"ReN_epoch{epoch}"),
                      (trainer.lpn, f"LPN_epoch{lpn_epoch}")):
        load_weights(net, os.path.join(run, f"{name}.pth"))
    trainer.opt_fusion = torch.optim.Adam(trainer.fusion.parameters(), lr=config["lr"])
    trainer.opt_recon = torch.optim.Adam(trainer.recon.parameters(), lr=config["lr"])
    if optimisers is not None:
        trainer.opt_fusion.load_state_dict(optimisers[0])
        trainer.opt_recon.load_state_dict(optimisers[1])
    trainer.set_rate(lr_at(config, epoch))
    trainer.crop_rng = torch.Generator().manual_seed(config["seed"] * 1000 + epoch)
    trainer.epoch, trainer.stage, trainer.step, trainer.sums = epoch, "fusion", 0, empty_sums()
    batches = epoch_batches(len(trainer.pairs), config["batch_size"], config["seed"], epoch)
    weights = loss_weights_at(config, epoch)
    while trainer.step < steps:
        trainer.fusion_round(batches, weights)
    return trainer.sums["fusion"] / max(trainer.sums["fusion_n"], 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="training run folder (config.json, *_epoch<N>.pth)")
    parser.add_argument("--epoch", type=int, required=True, help="F and R start where this epoch left them")
    parser.add_argument("--lpn", type=int, nargs="+", required=True, help="epochs whose P to train under")
    parser.add_argument("--steps", type=int, default=0, help="stage-2 steps (0: the whole stage)")
    parser.add_argument("--datasets", required=True, help="folder holding <TASK>/test/")
    parser.add_argument("--save", help="also write each F here as ReFusion_epoch<N>_lpn<M>.pth")
    parser.add_argument("--data", help="training data (default: the run's config.json)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if not os.path.isdir(args.run):
        raise UserError(f"no training run folder {args.run}")
    config = load_run_config(args.run)
    if not 1 <= args.epoch < config["epochs"]:
        raise UserError(f"--epoch must be between 1 and {config['epochs'] - 1}: stage 2 of the "
                        f"epoch after it is what is run")
    if args.steps < 0:
        raise UserError("--steps must be at least 0")
    needed = [f"ReFusion_epoch{args.epoch}", f"ReN_epoch{args.epoch}"] + [f"LPN_epoch{m}" for m in args.lpn]
    for name in needed:
        if not os.path.isfile(os.path.join(args.run, f"{name}.pth")):
            raise UserError(f"missing {os.path.join(args.run, name)}.pth")
    if args.save:
        for m in args.lpn:
            path = os.path.join(args.save, f"ReFusion_epoch{args.epoch}_lpn{m}.pth")
            if os.path.exists(path):
                raise UserError(f"{path} exists; not overwriting it")
    img1, img2 = test_split(args.datasets, config["task"])
    for folder in (img1, img2):
        if not os.path.isdir(folder):
            raise UserError(f"no test split folder {folder}")
    config.update(device=args.device, threads=args.threads)
    if args.data:
        config["data"] = args.data

    from train import Trainer
    from utils.checkpoint import save_weights
    from utils.data import fusion_steps_per_epoch
    trainer = Trainer(config)
    whole = fusion_steps_per_epoch(len(trainer.pairs), config["batch_size"], config["max_fusion_steps"])
    steps = min(args.steps, whole) if args.steps else whole
    optimisers = optimiser_states(args.run, args.epoch)
    print(f"F of epoch {args.epoch} of {args.run}, {steps} of epoch {args.epoch + 1}'s {whole} stage-2 "
          f"steps under each P; optimisers: "
          + ("the checkpoint's" if optimisers else "fresh Adam (checkpoint.pt is not in that epoch's stage 1)"))
    print(f"scored on {img1} / {img2}\n")
    print(f"| P of epoch | fusion loss | {' | '.join(SHOWN)} |")
    print("|---|---|" + "---|" * len(SHOWN))

    def show(label, loss, weights):
        _, row = score_weights(weights, img1, img2, device=args.device)
        print(f"| {label} | {loss} | " + " | ".join(f"{row[k]:.3f}" for k in SHOWN) + " |", flush=True)

    show(f"(start: F of epoch {args.epoch})", "", os.path.join(args.run, f"ReFusion_epoch{args.epoch}.pth"))
    with tempfile.TemporaryDirectory() as work:
        out = args.save or work
        os.makedirs(out, exist_ok=True)
        for lpn_epoch in args.lpn:
            loss = train_under(trainer, args.run, args.epoch, lpn_epoch, steps, optimisers)
            path = os.path.join(out, f"ReFusion_epoch{args.epoch}_lpn{lpn_epoch}.pth")
            save_weights(trainer.fusion, path)
            show(lpn_epoch, f"{loss:.4f}", path)


if __name__ == "__main__":
    sys.exit(run_script(main))
