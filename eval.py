"""Score fused images against their sources.

    python eval.py --img1 ir/ --img2 vis/ --fused test_results/IVIF/Gray [--csv scores.csv]

Pairs are matched by file name without extension across the three folders. Sources are read
as grey (OpenCV BGR->GRAY, rounded); the fused image as grey. Prints one row per image and the
mean: EN SD SF AG MI SCD VIF Qabf SSIM CC PSNR MSE (definitions in utils/metrics.py).
"""
import argparse
import csv
import os
import sys


def read_grey(path):
    import cv2
    import numpy as np

    from utils.image import read_rgb
    return np.round(cv2.cvtColor(read_rgb(path), cv2.COLOR_RGB2GRAY)).astype(np.float64)


def score_folders(img1, img2, fused):
    """``[(stem, {metric: value})]`` for every fused image with both sources."""
    from utils.errors import UserError
    from utils.image import ImageError, list_images, pair_images
    from utils.metrics import evaluate

    sources = {stem: (p1, p2) for stem, p1, p2 in pair_images(img1, img2)}
    results = list_images(fused)
    if not results:
        raise ImageError(f"no fused images in {fused}")
    missing = sorted(set(results) - set(sources))
    if missing:
        raise ImageError(f"fused images without sources: {', '.join(missing)}")
    rows = []
    for stem in sorted(results):
        a, b, f = (read_grey(p) for p in (*sources[stem], results[stem]))
        if not a.shape == b.shape == f.shape:
            paths = (*sources[stem], results[stem])
            sizes = ", ".join(f"{p} is {t.shape[1]}x{t.shape[0]}" for p, t in zip(paths, (a, b, f)))
            raise ImageError(f"size mismatch for {stem}: {sizes}")
        try:
            rows.append((stem, evaluate(a, b, f)))
        except UserError as error:
            raise ImageError(f"{stem}: {error}") from None
    return rows


def mean_row(rows):
    names = list(rows[0][1])
    return {name: sum(r[name] for _, r in rows) / len(rows) for name in names}


def format_table(rows):
    names = list(rows[0][1])
    width = max(12, max(len(stem) for stem, _ in rows))
    lines = [f"{'image':<{width}} " + " ".join(f"{n:>8}" for n in names)]
    for stem, row in rows + [("mean", mean_row(rows))]:
        lines.append(f"{stem:<{width}} " + " ".join(f"{row[n]:8.4f}" for n in names))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Score fused images (EN, SD, SF, AG, MI, SCD, VIF, Qabf, SSIM, CC, PSNR, MSE).")
    parser.add_argument("--img1", required=True, help="folder of first sources")
    parser.add_argument("--img2", required=True, help="folder of second sources")
    parser.add_argument("--fused", required=True, help="folder of fused images")
    parser.add_argument("--csv", help="also write the per-image and mean rows here")
    args = parser.parse_args(argv)
    from utils.errors import run_script
    return run_script(lambda: report(args))


def report(args):
    rows = score_folders(args.img1, args.img2, args.fused)
    print(format_table(rows))
    if args.csv:
        with open(args.csv, "w", newline="") as stream:
            writer = csv.writer(stream)
            names = list(rows[0][1])
            writer.writerow(["image", *names])
            for stem, row in rows + [("mean", mean_row(rows))]:
                writer.writerow([stem, *(f"{row[n]:.6f}" for n in names)])


if __name__ == "__main__":
    sys.exit(main())
