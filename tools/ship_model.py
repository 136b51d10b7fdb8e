"""Ship a finished training run as models/ReFusion_<TASK>.pth with its record models/<TASK>.json.

    python -m tools.ship_model --run exp/MIF/20261124_170514 \
        --command "python train.py --data data/MIF_train.h5 --task MIF --preset cpu --seed 0"

The record holds the exact commands (as given), the run's config, the h5 attributes of its data,
step counts, per-epoch wall time and losses (log.csv), and the machine. A run that has not
finished every epoch is refused unless ``--epoch N`` names a finished one. tools/quality_report.py
adds the "quality" entry afterwards; shipping new weights drops a stale one.
"""
import argparse
import csv
import hashlib
import json
import os
import platform
import shutil
import sys

from utils.errors import UserError, run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sha256(path):
    with open(path, "rb") as stream:
        return hashlib.sha256(stream.read()).hexdigest()


def same_tensors(path_a, path_b):
    import torch
    from utils.checkpoint import read_checkpoint
    a, b = read_checkpoint(path_a), read_checkpoint(path_b)
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def data_attributes(data_path):
    """The h5's recorded sources, patch size, stride and counts; for a folder dataset, its path."""
    if os.path.isdir(data_path):
        return {"folder": data_path}
    if not os.path.isfile(data_path):
        return {"missing_when_shipped": True}
    import h5py
    with h5py.File(data_path, "r") as h5:
        attributes = {key: value.item() if hasattr(value, "item") else value
                      for key, value in h5.attrs.items()}
    for key in ("source1", "source2"):
        if key in attributes and os.path.isabs(attributes[key]):
            attributes[key] = os.path.relpath(attributes[key], ROOT)
    return attributes


def ship(args):
    import torch
    from ReFusion import ReFusion
    from utils.atomic import write_atomic
    from utils.checkpoint import load_weights
    from utils.data import fusion_steps_per_epoch

    run = args.run.rstrip("/")
    config_path, log_path = os.path.join(run, "config.json"), os.path.join(run, "log.csv")
    weights = os.path.join(run, f"ReFusion_epoch{args.epoch}.pth" if args.epoch else "ReFusion.pth")
    for path in (config_path, log_path, weights):
        if not os.path.exists(path):
            raise UserError(f"{path} not found; --run must be a folder written by train.py")
    try:
        with open(config_path) as stream:
            config = json.load(stream)
        with open(log_path, newline="") as stream:
            log = list(csv.DictReader(stream))
    except ValueError as error:
        raise UserError(f"{run}: unreadable config.json or log.csv ({error})") from None
    missing = {"task", "epochs", "seed", "data", "batch_size", "max_meta_step",
               "max_fusion_steps"} - set(config)
    if missing:
        raise UserError(f"{config_path} lacks {', '.join(sorted(missing))}; not written by train.py")
    if args.epoch:
        if not 1 <= args.epoch <= len(log):
            raise UserError(f"{run} has finished epochs 1-{len(log)}, not {args.epoch}")
        log = log[:args.epoch]
    elif len(log) < config["epochs"]:
        raise UserError(f"{run} finished {len(log)} of {config['epochs']} epochs; resume it "
                        f"first, or ship a finished epoch with --epoch")
    epochs = len(log)
    task = config["task"]
    load_weights(ReFusion(), weights)  # refuses a broken file before anything is replaced

    target = os.path.join(args.models, f"ReFusion_{task}.pth")
    record_path = os.path.join(args.models, f"{task}.json")
    if os.path.exists(target) and not same_tensors(target, weights) and not args.force:
        raise UserError(f"{os.path.relpath(target)} exists and differs; add --force to replace it")
    previous = json.load(open(record_path)) if os.path.exists(record_path) else {}

    data_path = config["data"] if os.path.isabs(config["data"]) else os.path.join(ROOT, config["data"])
    data = data_attributes(data_path)
    fusion_steps = (fusion_steps_per_epoch(data["count"], config["batch_size"], config["max_fusion_steps"])
                    if "count" in data else config["max_fusion_steps"])
    seconds = [float(row["seconds"]) for row in log]
    digest = sha256(weights)
    record = {
        "task": task,
        "weights_sha256": digest,
        "commands": args.command,
        "note": args.note,
        "initialised_from": f"random (seed {config['seed']}); never from released weights",
        "data": {"path": config["data"], **data, "split": "train only"},
        "config": config,
        "steps": {"epochs": epochs, "of_scheduled_epochs": config["epochs"],
                  "meta_pairs_per_epoch": config["max_meta_step"],
                  "fusion_steps_per_epoch": fusion_steps,
                  "total_meta_pairs": epochs * config["max_meta_step"],
                  "total_fusion_steps": epochs * fusion_steps},
        "wall_time_s": {"per_epoch": seconds, "sum": round(sum(seconds), 1)},
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "final_losses": {key: float(value) for key, value in log[-1].items()
                         if key in ("meta_outer_loss", "fusion_loss", "recon_loss")},
        "per_epoch_log": log,
    }
    if previous.get("weights_sha256") == digest and "quality" in previous:
        record["quality"] = previous["quality"]
    write_atomic(target, lambda temporary: shutil.copyfile(weights, temporary))

    def write_record(temporary):
        with open(temporary, "w") as stream:
            json.dump(record, stream, indent=2)

    write_atomic(record_path, write_record)
    print(f"{os.path.relpath(target)} and {os.path.relpath(record_path)} written "
          f"({len(log)} epochs, {record['wall_time_s']['sum'] / 60:.0f} min)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="exp/<...>/<YYYYmmdd_HHMMSS> folder of a finished run")
    parser.add_argument("--command", action="append", default=[],
                        help="a command that produced the run, in order (repeat the flag)")
    parser.add_argument("--note", default="", help="anything a reader needs (interruptions, threads)")
    parser.add_argument("--epoch", type=int, default=0,
                        help="ship the weights after this finished epoch (default: the last, all done)")
    parser.add_argument("--force", action="store_true", help="replace different shipped weights")
    parser.add_argument("--models", default=os.path.join(ROOT, "models"), help="target folder")
    args = parser.parse_args(argv)
    return ship(args)


if __name__ == "__main__":
    sys.exit(run_script(main))
