"""The run tools end to end: score_run's scores.csv rows equal eval.py on test.py's output, only
missing epochs are scored and the learning curve is drawn; order_report and lpn_report read a run
folder. (Tests run the tools as commands.)"""
import csv
import os
import subprocess
import sys

import cv2
import numpy as np
import torch

from conftest import ROOT
from eval import mean_row, score_folders
from ReFusion import ReFusion
from tools.score_run import reference_levels
from tools.ship_model import sha256


def score_run(*args):
    return subprocess.run([sys.executable, "-m", "tools.score_run", *args, "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True)


def random_weights(path, seed):
    torch.manual_seed(seed)
    torch.save(ReFusion().state_dict(), path)


def write_test_split(datasets, seed):
    """Two random 20x24 IVIF test pairs under ``datasets/IVIF/test/{ir,vi}``."""
    rng = np.random.default_rng(seed)
    for folder in ("ir", "vi"):
        (datasets / "IVIF" / "test" / folder).mkdir(parents=True)
        for stem in ("a", "b"):
            cv2.imwrite(str(datasets / "IVIF" / "test" / folder / f"{stem}.png"),
                        rng.integers(0, 256, (20, 24), dtype=np.uint8))


def test_score_run_scores_each_epoch_once_and_draws_the_curve(tmp_path):
    write_test_split(tmp_path / "datasets", 0)
    test_split = tmp_path / "datasets" / "IVIF" / "test"
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"task": "IVIF"}')
    (run / "log.csv").write_text("epoch,meta_outer_loss,fusion_loss,recon_loss,lr,seconds\n"
                                 "1,0.4,0.01,0.25,0.0001,3425.1\n2,0.2,0.012,0.15,0.0001,3238.6\n")
    for epoch in (1, 2):
        random_weights(run / f"ReFusion_epoch{epoch}.pth", epoch)
    random_weights(tmp_path / "released.pth", 9)
    args = [str(run), "--datasets", str(tmp_path / "datasets"), "--released", str(tmp_path / "released.pth")]

    result = score_run(*args)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(run / "scores.csv")))
    shipped = "shipped@" + sha256(os.path.join(ROOT, "models", "ReFusion_IVIF.pth"))[:8]
    assert [r["weights"] for r in rows] == ["released", shipped, "epoch1", "epoch2"]
    assert rows[3]["seconds"] == "3238.6" and rows[3]["fusion_loss"] == "0.012" and rows[3]["pairs"] == "2"

    # epoch 1's row is eval.py's mean over what test.py writes with those weights
    out = tmp_path / "fused"
    fused = subprocess.run([sys.executable, "test.py", "--task", "IVIF", "--img1", str(test_split / "ir"),
                            "--img2", str(test_split / "vi"), "--model", str(run / "ReFusion_epoch1.pth"),
                            "--out", str(out), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)
    assert fused.returncode == 0, fused.stderr
    expected = mean_row(score_folders(str(test_split / "ir"), str(test_split / "vi"), str(out / "Gray")))
    for metric in ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM"):
        assert abs(float(rows[2][metric]) - expected[metric]) <= 1e-6 * max(1, abs(expected[metric]))

    # a new epoch adds one row; the others are not scored again
    random_weights(run / "ReFusion_epoch3.pth", 3)
    assert score_run(*args).returncode == 0
    rows_after = list(csv.DictReader(open(run / "scores.csv")))
    assert rows_after[:4] == rows and [r["weights"] for r in rows_after[4:]] == ["epoch3"]
    assert rows_after[4]["seconds"] == ""  # not in log.csv

    # another shipped model is a row of its own; the curve draws the last one scored
    random_weights(tmp_path / "other.pth", 5)
    assert score_run(*args, "--shipped", str(tmp_path / "other.pth")).returncode == 0
    rows_after = list(csv.DictReader(open(run / "scores.csv")))
    assert len(rows_after) == 6 and rows_after[5]["weights"].startswith("shipped@")
    assert rows_after[5]["weights"] != shipped and rows_after[5]["VIF"] != rows[1]["VIF"]

    assert reference_levels(rows_after)["shipped"] is rows_after[5]

    svg = (run / "learning_curve.svg").read_text()
    assert svg.count("<polyline") == 4 and svg.count('stroke-dasharray') == 8  # 4 panels x 2 levels
    for metric in ("VIF", "Qabf", "SSIM", "SF"):
        assert f">{metric}</text>" in svg
    os.remove(run / "learning_curve.svg")
    assert score_run(str(run), "--plot_only").returncode == 0 and (run / "learning_curve.svg").exists()

    absent = score_run(*args, "--shipped", str(tmp_path / "absent.pth"))
    assert absent.returncode == 1 and "absent.pth" in absent.stderr and "Traceback" not in absent.stderr

    missing = score_run(str(tmp_path / "nowhere"), "--plot_only")
    assert missing.returncode == 1 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr


def test_order_report_measures_how_f_follows_input_position():
    from tools.diagnostics.order_report import order_dependence
    pairs = torch.rand(3, 2, 16, 16, generator=torch.Generator().manual_seed(0))

    class Second(torch.nn.Module):  # copies whichever input comes second
        def forward(self, x):
            return x[:, 1:]

    class Mean(torch.nn.Module):  # order-invariant
        def forward(self, x):
            return x.mean(1, keepdim=True)

    copy = order_dependence(Second(), pairs)
    assert abs(copy["difference"] - (pairs[:, 0] - pairs[:, 1]).abs().mean().item()) < 1e-6
    assert abs(copy["given"][1] - 1) < 1e-5 and abs(copy["swapped"][0] - 1) < 1e-5
    assert abs(copy["given"][0]) < 0.2  # independent noise images
    mean = order_dependence(Mean(), pairs)
    assert mean["difference"] < 1e-7
    assert abs(mean["given"][0] - mean["swapped"][0]) < 1e-6


def test_order_report_runs_on_a_run_folder(tmp_path):
    write_test_split(tmp_path / "datasets", 1)
    run = tmp_path / "run"
    run.mkdir()
    random_weights(run / "ReFusion_epoch1.pth", 1)
    random_weights(tmp_path / "released.pth", 2)
    command = [sys.executable, "-m", "tools.diagnostics.order_report", "--task", "IVIF",
               "--datasets", str(tmp_path / "datasets")]
    out = subprocess.run(command + ["--run", str(run), "--reference", f"released={tmp_path / 'released.pth'}"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith(("| released", "| epoch 1"))]
    assert len(rows) == 2 and all(float(row[2]) > 0 for row in rows)
    for args in (["--run", str(tmp_path / "none")], ["--run", str(run), "--reference", "released"]):
        bad = subprocess.run(command + args, cwd=ROOT, capture_output=True, text=True)
        assert bad.returncode != 0 and bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


def test_lpn_report_gives_the_largest_change_of_p_between_epochs(tmp_path):
    from ReFusion import LPN
    write_test_split(tmp_path / "datasets", 3)
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    lpn = LPN()
    torch.save(lpn.state_dict(), run / "LPN_epoch1.pth")
    with torch.no_grad():
        first = next(lpn.parameters())
        first.view(-1)[0] += 0.0375
        first.view(-1)[1:] -= 0.01
    torch.save(lpn.state_dict(), run / "LPN_epoch2.pth")
    out = subprocess.run([sys.executable, "-m", "tools.diagnostics.lpn_report", "--run", str(run), "--task", "IVIF",
                          "--datasets", str(tmp_path / "datasets"), "--pairs", "2", "--size", "16"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith(("| 1 ", "| 2 "))]
    assert [row[6].strip() for row in rows] == ["", "", "0.03750", "0.03750"]
    assert all(0 <= float(row[5]) <= 1 for row in rows)
    assert "unweighted" not in out.stdout
    (run / "config.json").write_text('{"gradient_target": "max"}')
    out = subprocess.run(out.args, cwd=ROOT, capture_output=True, text=True)
    assert "P's w_grad columns are outputs no loss used" in out.stdout  # said where they mean nothing


def test_reports_read_the_training_domain_with_data(tmp_path):
    """``--data``: the figures on patches spread over a training .h5, first and last included,
    equal to order_dependence on those patches; neither --data nor --datasets is one error line."""
    from conftest import random_patch_file
    from tools.diagnostics.lpn_report import spread_patches
    from tools.diagnostics.order_report import order_dependence
    from utils.checkpoint import load_weights
    from utils.data import load_pairs
    data = tmp_path / "train.h5"
    random_patch_file(data, 7, 16, 0)
    pairs = load_pairs(str(data))
    probe = spread_patches(pairs, 3)
    assert torch.equal(probe, pairs[[0, 3, 6]].float() / 255)
    run = tmp_path / "run"
    run.mkdir()
    random_weights(run / "ReFusion_epoch1.pth", 1)
    command = [sys.executable, "-m", "tools.diagnostics.order_report", "--task", "IVIF", "--run", str(run)]
    out = subprocess.run(command + ["--data", str(data), "--pairs", "3"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "3 training patches" in out.stdout
    row = next(line.split("|") for line in out.stdout.splitlines() if line.startswith("| epoch 1"))
    expected = order_dependence(load_weights(ReFusion().eval(), str(run / "ReFusion_epoch1.pth")), probe)
    assert abs(float(row[2]) - expected["difference"]) < 1e-4
    bad = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
