"""Score every finished epoch of a training run and draw its learning curve.

    python -m tools.score_run exp/IVIF_full_schedule --datasets ../datasets \
        --released path/to/official/ReFusion_IVIF.pth

Appends to ``<run>/scores.csv`` one row per ``ReFusion_epoch<N>.pth`` not yet scored (its wall
time and losses from log.csv, then eval.py's means on ``<datasets>/<TASK>/test``), plus one row
each for the released weights (``--released``) and the shipped model (``--shipped``, default
``models/ReFusion_<TASK>.pth``) as levels to compare with. The shipped row is labelled with its
weights' hash (``shipped@<first 8 of sha256>``), so a model shipped later gets a row of its own
instead of being read as the one scored before it. Then writes
``<run>/learning_curve.svg`` (VIF, Qabf, SSIM and SF per epoch). ``--plot_only`` redraws the
figure from scores.csv alone.
"""
import argparse
import csv
import json
import os
import re
import sys

from tools.quality import SHOWN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ("weights", "epoch", "seconds", "meta_outer_loss", "fusion_loss", "recon_loss", "pairs") + SHOWN
CURVES = ("VIF", "Qabf", "SSIM", "SF")


def read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def append_row(path, row):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as stream:
        writer = csv.DictWriter(stream, COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def finished_epochs(run, network="ReFusion"):
    """The epochs N with a ``<network>_epoch<N>.pth`` in ``run``, in order."""
    return sorted(int(m.group(1)) for m in (re.fullmatch(rf"{network}_epoch(\d+)\.pth", name)
                                            for name in os.listdir(run)) if m)


def score_missing(run, task, datasets, released, shipped, device):
    from tools.quality import score_weights, test_split
    from tools.ship_model import sha256

    scores = os.path.join(run, "scores.csv")
    done = {row["weights"] for row in read_rows(scores)}
    log = {int(row["epoch"]): row for row in read_rows(os.path.join(run, "log.csv"))}
    shipped = shipped or os.path.join(ROOT, "models", f"ReFusion_{task}.pth")
    jobs = [("released", released, {})] if released else []
    if os.path.exists(shipped):
        jobs.append(("shipped@" + sha256(shipped)[:8], shipped, {}))
    for epoch in finished_epochs(run):
        entry = log.get(epoch, {})
        jobs.append((f"epoch{epoch}", os.path.join(run, f"ReFusion_epoch{epoch}.pth"),
                     {"epoch": epoch, **{k: entry.get(k, "") for k in
                                         ("seconds", "meta_outer_loss", "fusion_loss", "recon_loss")}}))
    img1, img2 = test_split(datasets, task)
    for label, path, extra in jobs:
        if label in done:
            continue
        pairs, means = score_weights(path, img1, img2, device=device)
        append_row(scores, {"weights": label, "pairs": pairs, **extra,
                            **{m: f"{means[m]:.6f}" for m in SHOWN}})
        print(f"{label}: " + " ".join(f"{m} {means[m]:.4f}" for m in SHOWN), flush=True)


def reference_levels(rows):
    """The rows without an epoch by name, the shipped rows under "shipped": the last one scored."""
    return {"shipped" if r["weights"].startswith("shipped") else r["weights"]: r
            for r in rows if not r["epoch"]}


def curve_svg(rows, title, planned=1):
    """Four small line plots (CURVES) of the epoch rows over the run's ``planned`` epochs, with
    the reference rows as dashed levels."""
    epochs = sorted((r for r in rows if r["epoch"]), key=lambda r: int(r["epoch"]))
    levels = reference_levels(rows)
    colours = {"released": "#c0392b", "shipped": "#7f8c8d"}
    width, height, pad = 330, 210, 42
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width}" height="{2 * height + 30}" '
             f'font-family="sans-serif" font-size="11">',
             f'<rect width="100%" height="100%" fill="white"/><text x="8" y="18" font-size="13">{title}</text>']
    last = max([int(r["epoch"]) for r in epochs] + [planned, 2])
    for i, metric in enumerate(CURVES):
        x0, y0 = (i % 2) * width, 30 + (i // 2) * height
        values = [float(r[metric]) for r in epochs] + [float(r[metric]) for r in levels.values()]
        low, high = (min(values), max(values)) if values else (0, 1)
        span = (high - low) or 1
        low, high = low - 0.08 * span, high + 0.08 * span

        def px(epoch, value):
            return (x0 + pad + (epoch - 1) / max(last - 1, 1) * (width - pad - 12),
                    y0 + height - pad + 14 - (value - low) / (high - low) * (height - pad - 10))
        parts.append(f'<rect x="{x0 + pad}" y="{y0 + 4}" width="{width - pad - 12}" '
                     f'height="{height - pad + 10}" fill="none" stroke="#999"/>')
        parts.append(f'<text x="{x0 + pad + 4}" y="{y0 + 18}" font-weight="bold">{metric}</text>')
        for value in (low + (high - low) * f for f in (0.1, 0.5, 0.9)):
            _, y = px(1, value)
            parts.append(f'<text x="{x0 + pad - 4}" y="{y + 4:.1f}" text-anchor="end">{value:.3g}</text>')
        for epoch in sorted({1, last, *range(10, last + 1, 10)}):
            x, _ = px(epoch, low)
            parts.append(f'<text x="{x:.1f}" y="{y0 + height - pad + 28}" text-anchor="middle">{epoch}</text>')
        for label, row in levels.items():
            _, y = px(1, float(row[metric]))
            colour = colours.get(label, "#333")
            parts.append(f'<line x1="{x0 + pad}" x2="{x0 + width - 12}" y1="{y:.1f}" y2="{y:.1f}" '
                         f'stroke="{colour}" stroke-dasharray="5,3"/>')
            parts.append(f'<text x="{x0 + width - 14}" y="{y - 3:.1f}" text-anchor="end" fill="{colour}">{label}</text>')
        points = " ".join("%.1f,%.1f" % px(int(r["epoch"]), float(r[metric])) for r in epochs)
        if points:
            parts.append(f'<polyline points="{points}" fill="none" stroke="#2471a3" stroke-width="2"/>')
            parts += [f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="2.5" fill="#2471a3"/>'
                      for p in points.split()]
    parts.append(f'<text x="{width}" y="{2 * height + 26}" text-anchor="middle">epoch</text></svg>')
    return "\n".join(parts) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="training run folder (ReFusion_epoch<N>.pth, log.csv)")
    parser.add_argument("--datasets", help="folder holding <TASK>/test/<source folders>")
    parser.add_argument("--released", help="the authors' released weights for the task, as a level")
    parser.add_argument("--shipped", help="the model to compare with (default: models/ReFusion_<TASK>.pth)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--plot_only", action="store_true", help="only redraw the figure")
    args = parser.parse_args(argv)

    from utils.errors import UserError, run_script

    def action():
        config = os.path.join(args.run, "config.json")
        if not os.path.exists(config):
            raise UserError(f"{args.run} is not a training run folder (no config.json)")
        config = json.load(open(config))
        task = config["task"]
        for given in (args.released, args.shipped):
            if given and not os.path.isfile(given):
                raise UserError(f"{given}: no such weights file")
        if not args.plot_only:
            if not args.datasets:
                raise UserError("--datasets is needed to score (or use --plot_only)")
            score_missing(args.run, task, args.datasets, args.released, args.shipped, args.device)
        rows = read_rows(os.path.join(args.run, "scores.csv"))
        if not rows:
            raise UserError(f"nothing scored yet in {args.run}/scores.csv")
        figure = os.path.join(args.run, "learning_curve.svg")
        with open(figure, "w") as stream:
            stream.write(curve_svg(rows, f"{task}: test-split means per epoch ({os.path.basename(os.path.normpath(args.run))})",
                                   config.get("epochs", 1)))
        print(f"wrote {figure}")
    return run_script(action)


if __name__ == "__main__":
    from utils.runtime import keep_freed_memory
    keep_freed_memory()
    sys.exit(main())
