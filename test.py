"""Fuse image pairs with a trained ReFusion model.

    python test.py                                   # every task on the bundled test cases
    python test.py --task IVIF --img1 ir/ --img2 vis/ --model my.pth --out results/
    python test.py --task MFIF --img1 a.png --img2 b.png --device cpu

Writes ``<out>/Gray/<stem>.png`` and, when a source has colour, ``<out>/RGB/<stem>.png``.
Pairs are matched by file name without extension.
"""
import argparse
import os
import sys

# -----------------------------------------------------------------------------
# Edit these, or override them on the command line (python test.py --help).
task = "all"          # IVIF | MIF | MFIF | MEIF | all
path_img1 = None      # file or folder; None: test_cases/<task>/<first source folder>
path_img2 = None      # file or folder; None: test_cases/<task>/<second source folder>
path_model = None     # None: models/ReFusion_<task>.pth
path_result = None    # None: test_results/<task>
device = "auto"       # auto | cpu | cuda | mps
max_memory = "auto"   # working memory of the network ("512MB", "4GB"); larger images are fused
                      # exactly from tiles. auto: what the device has available
# -----------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.abspath(__file__))
MODEL_HINT = ("train one with train.py, or use the authors' released weights: "
              "--model path/to/ReFusion_<TASK>.pth")


from utils.errors import UserError, run_script  # noqa: E402 (stdlib-only imports, before torch)
from utils.tasks import TASKS  # noqa: E402


class UsageError(UserError):
    pass


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Fuse image pairs with ReFusion.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--task", default=task, choices=[*TASKS, "all"],
                        help="which model and bundled test cases; all: every task on its test cases")
    parser.add_argument("--img1", default=path_img1,
                        help="first source: image file or folder (None: test_cases/<task>/<first source>)")
    parser.add_argument("--img2", default=path_img2,
                        help="second source: image file or folder (None: test_cases/<task>/<second source>)")
    parser.add_argument("--model", default=path_model,
                        help="ReFusion weights (.pth; None: models/ReFusion_<task>.pth)")
    parser.add_argument("--out", default=path_result, help="result folder (None: test_results/<task>)")
    parser.add_argument("--device", default=device, help="auto | cpu | cuda | mps")
    parser.add_argument("--max_memory", default=max_memory,
                        help="memory the network may use, e.g. 512MB or 4GB (a bare number is bytes; "
                             "auto: what is available); larger images are fused exactly in tiles")
    return parser.parse_args(argv)


def plan_jobs(args):
    """``[(task, img1, img2, model, out)]`` with defaults filled in; checks every job up front."""
    explicit = [args.img1, args.img2, args.model, args.out]
    if args.task == "all":
        if any(value is not None for value in explicit):
            raise UsageError("--img1/--img2/--model/--out need a single --task "
                             f"({', '.join(TASKS)}), not 'all'")
        tasks = list(TASKS)
    else:
        tasks = [args.task]
    jobs = []
    for name in tasks:
        first, second = TASKS[name].test_cases
        jobs.append((name,
                     args.img1 or os.path.join(ROOT, "test_cases", name, first),
                     args.img2 or os.path.join(ROOT, "test_cases", name, second),
                     args.model or os.path.join(ROOT, "models", f"ReFusion_{name}.pth"),
                     args.out or os.path.join(ROOT, "test_results", name)))
    missing = [path for job in jobs for path in job[1:4] if not os.path.exists(path)]
    untrained = [job for job in jobs if job[3] in missing]
    ready = [job for job in jobs if not set(job[1:4]) & set(missing)]
    # with every task requested, fuse what can be fused and list the tasks without a model
    if missing and not (args.task == "all" and ready and len(ready) + len(untrained) == len(jobs)):
        raise UsageError("not found: " + ", ".join(os.path.relpath(p) for p in missing)
                         + (f" (models: {MODEL_HINT})" if untrained else ""))
    for name, img1, img2, _, out in jobs:
        inputs = {os.path.realpath(p if os.path.isdir(p) else os.path.dirname(p) or ".")
                  for p in (img1, img2)}
        outputs = {os.path.realpath(os.path.join(out, sub)) for sub in ("", "Gray", "RGB")}
        if inputs & outputs:
            raise UsageError(f"--out {out} would write into an input folder; choose another folder")
    return ready, [job[0] for job in untrained]


def checked_pairs(pairs):
    """Every pair decoded once before any is fused: ``(good pairs, error lines of the bad ones)``."""
    from utils.fuse import check_sizes
    from utils.image import decode
    good, bad = [], []
    for stem, path1, path2 in pairs:
        try:
            check_sizes(path1, path2, decode(path1), decode(path2))
            good.append((stem, path1, path2))
        except UserError as error:
            bad.append(f"{stem}: {error}")
    return good, bad


def check_writable(folder):
    """Make ``folder`` and check that a file can be written there, before any work is done."""
    import tempfile
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise UsageError(f"cannot write to {folder}: {error.strerror or error}") from None


def write_result(out, stem, grey, rgb):
    """Gray/<stem>.png and, for a colour pair, RGB/<stem>.png; never one without the other."""
    from utils.image import write_png
    gray_path = os.path.join(out, "Gray", f"{stem}.png")
    write_png(gray_path, grey)
    if rgb is not None:
        try:
            write_png(os.path.join(out, "RGB", f"{stem}.png"), rgb)
        except BaseException:
            os.remove(gray_path)
            raise


def run(args):
    from tqdm import tqdm

    from ReFusion import ReFusion
    from utils.checkpoint import load_weights
    from utils.fuse import FusionOutOfMemory, fuse_pair
    from utils.image import pair_images
    from utils.runtime import parse_size, resolve_device
    from utils.tiled import LEAST_BUDGET, LEAST_TILE

    jobs, untrained = plan_jobs(args)
    budget = parse_size(args.max_memory)
    if budget is not None and budget < LEAST_BUDGET:
        raise UsageError(f"--max_memory {args.max_memory} ({budget} bytes) is less than one "
                         f"{LEAST_TILE} px tile needs: give at least {-(-LEAST_BUDGET // 2 ** 20)}MB")
    target = resolve_device(args.device)
    failures = 0
    for name, img1, img2, model_path, out in jobs:
        pairs = pair_images(img1, img2)
        good, bad = checked_pairs(pairs)
        for line in bad:
            print(f"error: {line}", file=sys.stderr)
        fused = colour = 0
        if good:
            check_writable(os.path.join(out, "Gray"))
            model = load_weights(ReFusion(), model_path, MODEL_HINT).to(target).eval()
            for stem, path1, path2 in tqdm(good, desc=name, unit="pair"):
                try:
                    grey, rgb = fuse_pair(model, path1, path2, target, budget)
                except (FusionOutOfMemory, UserError) as error:
                    bad.append(stem)
                    tqdm.write(f"error: {stem}: {error}", file=sys.stderr)
                    continue
                write_result(out, stem, grey, rgb)
                fused, colour = fused + 1, colour + (rgb is not None)
        failures += len(bad)
        print(f"{name}: fused {fused} of {len(pairs)} pairs ({colour} in colour)"
              + (f", {len(bad)} failed" if bad else "") + f" -> {out}")
    if untrained:
        models = ", ".join(os.path.relpath(os.path.join(ROOT, "models", f"ReFusion_{t}.pth")) for t in untrained)
        raise UsageError(f"no model for {', '.join(untrained)}: {models} not found ({MODEL_HINT})")
    return 1 if failures else 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_script(lambda: run(args))


if __name__ == "__main__":
    from utils.runtime import keep_freed_memory
    keep_freed_memory()
    sys.exit(main())
