"""Quality of our weights next to the authors' released weights on the shared test sets.

    python bench/quality_report.py                       # every task with a models/ReFusion_<TASK>.pth
    python bench/quality_report.py --tasks IVIF --limit 10
    python bench/quality_report.py --tasks MEIF --run exp/MEIF/<run>   # every epoch of a run

For each task: fuse ``../shared/datasets/<TASK>/test`` with ``models/ReFusion_<TASK>.pth`` and
with ``../shared/reference/official_weights/ReFusion_<TASK>.pth``, score both with eval.py's
metrics, print the two mean rows side by side as a Markdown table (README) and store them in
``models/<TASK>.json`` under ``"quality"``. With ``--run``, the weights scored are instead every
``ReFusion_epoch<N>.pth`` of that training run (a learning curve; nothing is stored).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(ROOT, "..", "shared")
TEST_FOLDERS = {"IVIF": ("ir", "vi"), "MIF": ("CT_PET_SPECT", "MRI"), "MFIF": ("A", "B"),
                "MEIF": ("under", "over")}
SHOWN = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM")


def fuse(task, img1, img2, model, out):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "test.py"), "--task", task,
                             "--img1", img1, "--img2", img2, "--model", model, "--out", out],
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"test.py failed for {task} with {model}: {(result.stderr.strip().splitlines() or ['no message'])[-1]}")


def limited_copy(folder, stems, target):
    os.makedirs(target)
    for name in os.listdir(folder):
        if os.path.splitext(name)[0] in stems:
            os.symlink(os.path.join(folder, name), os.path.join(target, name))
    return target


def epoch_weights(run):
    """``[("epoch N", path), ...]`` for the ``ReFusion_epoch<N>.pth`` files of a training run."""
    if not os.path.isdir(run):
        sys.exit(f"error: no training run folder {run}")
    epochs = sorted(int(name[len("ReFusion_epoch"):-len(".pth")]) for name in os.listdir(run)
                    if name.startswith("ReFusion_epoch") and name.endswith(".pth"))
    return [(f"epoch {n}", os.path.join(run, f"ReFusion_epoch{n}.pth")) for n in epochs]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", default="IVIF,MIF,MFIF,MEIF")
    parser.add_argument("--limit", type=int, default=0, help="first N test pairs only (0: all)")
    parser.add_argument("--run", help="score each epoch's weights of this training run instead")
    args = parser.parse_args()

    from eval import mean_row, score_folders
    from utils.image import pair_images

    print("| task | weights | pairs | " + " | ".join(SHOWN) + " |")
    print("|---|---|---|" + "---|" * len(SHOWN))
    for task in args.tasks.split(","):
        ours = os.path.join(ROOT, "models", f"ReFusion_{task}.pth")
        released = os.path.join(SHARED, "reference", "official_weights", f"ReFusion_{task}.pth")
        candidates = [("ours", ours)] if not args.run else epoch_weights(args.run)
        first, second = (os.path.join(SHARED, "datasets", task, "test", d) for d in TEST_FOLDERS[task])
        missing = [path for _, path in candidates + [("released", released)] if not os.path.exists(path)]
        if missing or not candidates or not os.path.isdir(first):
            print(f"| {task} | (skipped: no {', '.join(missing) or 'epoch weights'} or no shared data) |")
            continue
        with tempfile.TemporaryDirectory() as work:
            stems = [stem for stem, _, _ in pair_images(first, second)]
            if args.limit:
                stems = set(stems[:args.limit])
                first = limited_copy(first, stems, os.path.join(work, "img1"))
                second = limited_copy(second, stems, os.path.join(work, "img2"))
            means = {}
            for label, weights in candidates + [("released", released)]:
                out = os.path.join(work, label)
                fuse(task, first, second, weights, out)
                rows = score_folders(first, second, os.path.join(out, "Gray"))
                means[label] = mean_row(rows)
                print(f"| {task} | {label} | {len(rows)} | "
                      + " | ".join(f"{means[label][m]:.3f}" for m in SHOWN) + " |")
        if args.run:
            continue
        record_path = os.path.join(ROOT, "models", f"{task}.json")
        record = json.load(open(record_path)) if os.path.exists(record_path) else {}
        record["quality"] = {"test_set": f"shared/datasets/{task}/test", "pairs": len(rows),
                             "ours": means["ours"], "released": means["released"],
                             "ratio_ours_to_released": {m: means["ours"][m] / means["released"][m]
                                                        for m in ("VIF", "Qabf", "SSIM")}}
        with open(record_path, "w") as stream:
            json.dump(record, stream, indent=2)


if __name__ == "__main__":
    main()
