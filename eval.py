"""Score fused images against their sources: one method, or several side by side for a paper.

    python eval.py --img1 ir/ --img2 vis/ --fused test_results/IVIF/Gray [--csv scores.csv]
    python eval.py --img1 ir/ --img2 vis/ --fused ReFusion=out/refusion CDDFuse=out/cddfuse \
        --table table.md --figure figure.png --pairs 00710N,00906N --zoom 200,120,96,64

Pairs are matched by file name without extension across the folders. Sources are read as grey
(OpenCV BGR->GRAY, rounded); fused images as grey. One method prints one row per image and the
mean; several print one row per method, the means over the pairs every method fused, the best of
each metric marked (higher is better, MSE lower). ``--table`` writes that table as Markdown,
CSV or LaTeX (by extension), ``--csv`` every pair's scores, ``--figure`` a qualitative figure
(``utils/figure.py``). Metrics (``utils/metrics.py``): EN SD SF AG MI SCD VIF Qabf SSIM CC PSNR MSE.
A pair that cannot be scored (unreadable, sizes differ) gets one ``error:`` line and is left out
of every mean; the others are still scored, and the exit status is then 1.
"""
import argparse
import csv
import os
import sys

from utils.errors import UserError
from utils.figure import figure_pairs, render_comparison

LOWER_IS_BETTER = {"MSE"}


def read_grey(path):
    import cv2
    import numpy as np

    from utils.image import read_rgb
    return np.round(cv2.cvtColor(read_rgb(path), cv2.COLOR_RGB2GRAY)).astype(np.float64)


# -- what to score ---------------------------------------------------------------------------
def parse_methods(specs):
    """``NAME=DIR`` or a bare ``DIR`` (named by its path) -> ``[(name, dir)]``."""
    methods = []
    for spec in specs:
        name, folder = spec.split("=", 1) if "=" in spec and not os.path.isdir(spec) else (spec, spec)
        if not name or not folder:
            raise UserError(f"--fused {spec}: give NAME=DIR or DIR")
        if name in (n for n, _ in methods):
            raise UserError(f"method name '{name}' is given twice")
        methods.append((name, folder))
    return methods


def parse_metrics(text):
    from utils.metrics import METRICS
    if not text:
        return list(METRICS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    lookup = {n.lower(): n for n in METRICS}
    unknown = [n for n in names if n.lower() not in lookup]
    if unknown:
        raise UserError(f"unknown metric '{unknown[0]}': choose from {', '.join(METRICS)}")
    return [lookup[n.lower()] for n in names]


def fused_images(methods, sources):
    """``{name: {stem: path}}``; an empty folder or a fused image without sources is an error."""
    from utils.image import ImageError, list_images
    found = {}
    for name, folder in methods:
        images = list_images(folder)
        if not images:
            raise ImageError(f"{name}: no fused images in {folder}")
        orphans = sorted(set(images) - set(sources))
        if orphans:
            raise ImageError(f"{name}: fused images without sources: {', '.join(orphans)}")
        found[name] = images
    return found


# -- scoring ---------------------------------------------------------------------------------
def score_pair(task):
    """One pair for every method that fused it: ``(stem, {method: scores}, [error lines])``.
    The sources are read once; a method's failure does not stop the others."""
    from utils.metrics import METRICS, MIN_SIDE
    stem, path1, path2, fused, names = task
    try:
        a, b = read_grey(path1), read_grey(path2)
    except UserError as error:
        return stem, {}, [f"{stem}: {error}"]
    scores, errors = {}, []
    for method, path in fused.items():
        where = f"{method}, {stem}" if method else stem
        try:
            f = read_grey(path)
            if not a.shape == b.shape == f.shape:
                sizes = ", ".join(f"{p} is {t.shape[1]}x{t.shape[0]}" for p, t in zip((path1, path2, path), (a, b, f)))
                raise UserError(f"size mismatch: {sizes}")
            if min(f.shape) < MIN_SIDE:
                raise UserError(f"{f.shape[1]}x{f.shape[0]} pixels is too small to score: the metrics "
                                f"need at least {MIN_SIDE}x{MIN_SIDE} (SSIM's window)")
            scores[method] = {n: METRICS[n](a, b, f) for n in names}
        except UserError as error:
            errors.append(f"{where}: {error}")
    return stem, scores, errors


def score(img1, img2, methods, names=None, jobs=1, progress=False):
    """Score every method on every pair it fused.

    Returns ``(per_pair, errors, missing)``: ``{stem: {method: {metric: value}}}`` for the pairs
    that every method fused and scored, ``{stem: [error lines]}`` for the pairs that failed, and
    ``{method: [stems it lacks]}``, with ``None: [source pairs no method fused]``. ``jobs`` processes score pairs in parallel (0: one per core).
    """
    from tqdm import tqdm

    from utils.image import pair_images
    from utils.metrics import METRICS
    names = names or list(METRICS)
    sources = {stem: (p1, p2) for stem, p1, p2 in pair_images(img1, img2)}
    fused = fused_images(methods, sources)
    fused_stems = sorted(set().union(*fused.values()))
    missing = {m: sorted(set(fused_stems) - set(images)) for m, images in fused.items()}
    missing[None] = sorted(set(sources) - set(fused_stems))
    missing = {m: stems for m, stems in missing.items() if stems}
    single = len(methods) == 1
    tasks = [(stem, *sources[stem], {("" if single else m): fused[m][stem] for m in fused if stem in fused[m]},
              names) for stem in fused_stems]
    jobs = min(jobs or os.cpu_count() or 1, len(tasks))
    bar = dict(total=len(tasks), desc="scoring", unit="pair", disable=not progress, file=sys.stderr)
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(jobs) as pool:
            results = list(tqdm(pool.map(score_pair, tasks), **bar))
    else:
        results = [score_pair(task) for task in tqdm(tasks, **bar)]
    per_pair, errors = {}, {}
    for stem, scores, failed in results:
        if failed:
            errors[stem] = failed
        elif len(scores) == len(methods):
            per_pair[stem] = {(methods[0][0] if single else m): s for m, s in scores.items()}
    return per_pair, errors, missing


def score_folders(img1, img2, fused):
    """``[(stem, {metric: value})]`` for every fused image in one folder (the tools' entry);
    the first pair that fails is an error."""
    per_pair, errors, _ = score(img1, img2, [(fused, fused)])
    if errors:
        raise UserError(next(iter(errors.values()))[0])
    return [(stem, scores[fused]) for stem, scores in per_pair.items()]


def mean_row(rows):
    names = list(rows[0][1])
    return {name: sum(r[name] for _, r in rows) / len(rows) for name in names}


def method_means(per_pair, methods):
    """``{method: {metric: mean over the pairs}}``."""
    return {m: mean_row([(stem, scores[m]) for stem, scores in per_pair.items()]) for m, _ in methods}


def best_methods(means):
    """``{metric: the method with the best mean}`` (ties: the first)."""
    methods = list(means)
    names = list(means[methods[0]])
    return {n: (min if n in LOWER_IS_BETTER else max)(methods, key=lambda m: means[m][n]) for n in names}


# -- output ----------------------------------------------------------------------------------
def format_table(rows):
    """One method's per-image rows and their mean, as text."""
    names = list(rows[0][1])
    width = max(12, max(len(stem) for stem, _ in rows))
    lines = [f"{'image':<{width}} " + " ".join(f"{n:>8}" for n in names)]
    for stem, row in rows + [("mean", mean_row(rows))]:
        lines.append(f"{stem:<{width}} " + " ".join(f"{row[n]:8.4f}" for n in names))
    return "\n".join(lines)


def comparison(means, kind="text"):
    """The methods x metrics table of means, best marked: ``text``, ``md``, ``csv`` or ``tex``."""
    best = best_methods(means)
    names = list(best)
    arrows = [f"{n}{'↓' if n in LOWER_IS_BETTER else '↑'}" for n in names]
    cell = lambda m, n: f"{means[m][n]:.4f}"  # noqa: E731
    if kind == "csv":
        rows = [["method", *names]] + [[m, *(cell(m, n) for n in names)] for m in means]
        return rows + [["best", *(best[n] for n in names)]]
    if kind == "md":
        mark = lambda m, n: f"**{cell(m, n)}**" if best[n] == m else cell(m, n)  # noqa: E731
        lines = ["| method | " + " | ".join(arrows) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {m} | " + " | ".join(mark(m, n) for n in names) + " |" for m in means]
        return "\n".join(lines) + "\n"
    if kind == "tex":
        escape = lambda t: t.replace("\\", r"\textbackslash{}").translate(  # noqa: E731
            {ord(c): "\\" + c for c in "&%$#_{}"})
        mark = lambda m, n: rf"\textbf{{{cell(m, n)}}}" if best[n] == m else cell(m, n)  # noqa: E731
        heads = [escape(n) + (r" $\downarrow$" if n in LOWER_IS_BETTER else r" $\uparrow$") for n in names]
        lines = [r"\begin{tabular}{l" + "c" * len(names) + "}", r"\toprule",
                 "Method & " + " & ".join(heads) + r" \\", r"\midrule"]
        lines += [escape(m) + " & " + " & ".join(mark(m, n) for n in names) + r" \\" for m in means]
        return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"
    width = max(8, *(len(m) for m in means))
    lines = [f"{'method':<{width}} " + " ".join(f"{a:>9}" for a in arrows)]
    for m in means:
        lines.append(f"{m:<{width}} " + " ".join(f"{cell(m, n) + ('*' if best[n] == m else ' '):>9}"
                                                 for n in names))
    return "\n".join(lines + ["* best of each metric"])


def write_text(path, text):
    from utils.atomic import write_atomic

    def write(temporary):
        with open(temporary, "w", newline="") as stream:
            stream.write(text)
    write_atomic(path, write)


def csv_text(rows):
    import io
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def per_pair_rows(per_pair, methods):
    """The ``--csv`` rows: one method as ``image, metrics...`` plus its mean; several with a
    leading ``method`` column."""
    names = list(next(iter(next(iter(per_pair.values())).values())))
    single = len(methods) == 1
    rows = [(["image"] if single else ["method", "image"]) + names]
    for method, _ in methods:
        pairs = [(stem, scores[method]) for stem, scores in per_pair.items()]
        for stem, row in pairs + [("mean", mean_row(pairs))]:
            rows.append(([] if single else [method]) + [stem] + [f"{row[n]:.6f}" for n in names])
    return rows


def table_kind(path):
    kind = os.path.splitext(path)[1].lower().lstrip(".")
    if kind not in ("md", "csv", "tex"):
        raise UserError(f"--table {path}: use a .md, .csv or .tex file name")
    return kind


def write_table(path, means):
    kind = table_kind(path)
    table = comparison(means, kind)
    write_text(path, csv_text(table) if kind == "csv" else table)


def parse_zoom(text):
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--zoom {text}: give x,y,w,h in pixels, e.g. 120,80,64,48") from None
    if min(x, y) < 0 or min(w, h) < 1:
        raise UserError(f"--zoom {text}: x and y must be at least 0, w and h at least 1")
    return x, y, w, h


def report(args):
    methods = parse_methods(args.fused)
    names = parse_metrics(args.metrics)
    zoom = parse_zoom(args.zoom) if args.zoom else None
    if args.table:
        table_kind(args.table)
    chosen = [s.strip() for s in args.pairs.split(",") if s.strip()] if args.pairs else None
    if args.figure and chosen is not None:
        figure_pairs(args.img1, args.img2, methods, chosen)
    per_pair, errors, missing = score(args.img1, args.img2, methods, names, args.jobs,
                                      progress=sys.stderr.isatty())
    for method, stems in missing.items():
        shown = ", ".join(stems[:10]) + (f" and {len(stems) - 10} more" if len(stems) > 10 else "")
        if method is None:
            print(f"note: {len(stems)} of the source pairs have no fused image and are not scored: {shown}",
                  file=sys.stderr)
        else:
            print(f"note: {method} lacks {len(stems)} pair(s), left out of every mean: {shown}", file=sys.stderr)
    for lines in errors.values():
        for line in lines:
            print(f"error: {line}", file=sys.stderr)
    if not per_pair:
        if errors:
            return 1
        raise UserError("no pair was fused by every method")
    if len(methods) == 1:
        rows = [(stem, scores[methods[0][0]]) for stem, scores in per_pair.items()]
        print(format_table(rows))
    means = method_means(per_pair, methods)
    if len(methods) > 1:
        print(f"means over the {len(per_pair)} pairs every method fused")
        print(comparison(means))
    if args.csv:
        write_text(args.csv, csv_text(per_pair_rows(per_pair, methods)))
    if args.table:
        write_table(args.table, means)
    if args.figure:
        labels = [os.path.basename(os.path.normpath(folder)) for folder in (args.img1, args.img2)]
        pairs = figure_pairs(args.img1, args.img2, methods, chosen or list(per_pair)[:3])
        render_comparison(args.figure, labels + [name for name, _ in methods], pairs, zoom)
    if errors:
        print(f"scored {len(per_pair)} of {len(per_pair) + len(errors)} pairs, {len(errors)} failed",
              file=sys.stderr)
        return 1
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Score fused images (EN, SD, SF, AG, MI, SCD, VIF, Qabf, SSIM, CC, PSNR, MSE), "
                    "one method or several side by side.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--img1", required=True, help="folder of first sources (e.g. infrared)")
    parser.add_argument("--img2", required=True, help="folder of second sources (e.g. visible)")
    parser.add_argument("--fused", required=True, nargs="+", metavar="NAME=DIR",
                        help="folders of fused images, each NAME=DIR or a bare DIR (named by its path)")
    parser.add_argument("--metrics", default="", help="comma-separated metrics to score (default: all)")
    parser.add_argument("--csv", help="write every pair's scores (and each method's mean) to this CSV")
    parser.add_argument("--table", help="write the methods x metrics table of means: .md, .csv or .tex")
    parser.add_argument("--figure", help="write a qualitative figure (PNG): sources and each method's result")
    parser.add_argument("--pairs", help="comma-separated pair names for --figure (default: the first 3)")
    parser.add_argument("--zoom", help="x,y,w,h: a region of every pair to magnify as an inset in --figure")
    parser.add_argument("--jobs", type=int, default=0, help="processes scoring in parallel (0: one per core)")
    args = parser.parse_args(argv)
    from utils.errors import run_script
    return run_script(lambda: report(args))


if __name__ == "__main__":
    sys.exit(main())
