"""Quality of the shipped models next to the authors' released weights, on a dataset's test split.

    python -m tools.quality_report --datasets DATASETS --released RELEASED
    python -m tools.quality_report --datasets DATASETS --released RELEASED --tasks IVIF --limit 10

``DATASETS`` holds ``<TASK>/test/<source folders>`` (utils/tasks.py), ``RELEASED`` the authors'
``ReFusion_<TASK>.pth``. For each task: fuse the test split with ``models/ReFusion_<TASK>.pth``
and with the released weights, score both with eval.py's metrics, print the mean rows side by
side as a Markdown table (README) and store them in ``models/<TASK>.json`` under ``"quality"``.
A whole run's learning curve is ``tools/score_run.py``.
"""
import argparse
import json
import os
import sys

from tools.quality import SHOWN, score_weights, test_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def report(args):
    from utils.errors import UserError
    from utils.image import pair_images
    from utils.tasks import TASKS

    print("| task | weights | pairs | " + " | ".join(SHOWN) + " |")
    print("|---|---|---|" + "---|" * len(SHOWN))
    for task in args.tasks.split(","):
        if task not in TASKS:
            raise UserError(f"unknown task '{task}': choose from {', '.join(TASKS)}")
        candidates = {"ours": os.path.join(ROOT, "models", f"ReFusion_{task}.pth"),
                      "released": os.path.join(args.released, f"ReFusion_{task}.pth")}
        first, second = test_split(args.datasets, task)
        missing = [path for path in (*candidates.values(), first, second) if not os.path.exists(path)]
        if missing:
            print(f"| {task} | (skipped: {', '.join(missing)} not found) |")
            continue
        stems = [stem for stem, _, _ in pair_images(first, second)]
        stems = set(stems[:args.limit] if args.limit else stems)
        means = {}
        for label, weights in candidates.items():
            pairs, means[label] = score_weights(weights, first, second, stems)
            print(f"| {task} | {label} | {pairs} | " + " | ".join(f"{means[label][m]:.3f}" for m in SHOWN) + " |")
        if args.limit:
            continue  # a partial test split is not a record
        record_path = os.path.join(ROOT, "models", f"{task}.json")
        record = json.load(open(record_path)) if os.path.exists(record_path) else {}
        record["quality"] = {"test_set": f"datasets/{task}/test (docs/DATASETS.md)", "pairs": pairs,
                             "ours": means["ours"], "released": means["released"],
                             "ratio_ours_to_released": {m: means["ours"][m] / means["released"][m]
                                                        for m in ("VIF", "Qabf", "SSIM")}}
        with open(record_path, "w") as stream:
            json.dump(record, stream, indent=2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", required=True, help="folder holding <TASK>/test/")
    parser.add_argument("--released", required=True, help="folder holding the released ReFusion_<TASK>.pth")
    parser.add_argument("--tasks", default="IVIF,MIF,MFIF,MEIF")
    parser.add_argument("--limit", type=int, default=0, help="first N test pairs only (0: all; stores nothing)")
    args = parser.parse_args(argv)
    from utils.errors import run_script
    return run_script(lambda: report(args))


if __name__ == "__main__":
    from utils.runtime import keep_freed_memory
    keep_freed_memory()
    sys.exit(main())
