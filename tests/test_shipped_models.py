"""The shipped models and their records agree: weights, models/<TASK>.json and README's quality table."""
import hashlib
import json
import os
import re

import pytest
import torch

from conftest import ROOT
from ReFusion import ReFusion

TASKS = ("IVIF", "MIF", "MFIF", "MEIF")


def record(task):
    with open(os.path.join(ROOT, "models", f"{task}.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("task", TASKS)
def test_record_describes_the_shipped_weights(task):
    info = record(task)
    path = os.path.join(ROOT, "models", f"ReFusion_{task}.pth")
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == info["weights_sha256"]
    ReFusion().load_state_dict(torch.load(path, map_location="cpu"))  # strict: every key, every shape
    assert info["task"] == info["config"]["task"] == task
    assert "never from released weights" in info["initialised_from"] and info["data"]["split"] == "train only"
    assert any(command.startswith("python train.py") for command in info["commands"])


@pytest.mark.parametrize("task", TASKS)
def test_readme_quality_rows_are_the_recorded_scores(task):
    """README's mean rows (ours and released) and the share table repeat models/<TASK>.json."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    quality = record(task)["quality"]
    columns = ["EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM"]
    for who, label in (("ours", r"ours \([^|]*\)"), ("released", "released")):
        row = re.search(rf"^\| {task} \| {label} \| {quality['pairs']} \|(.*)\|$", readme, re.M)
        assert row, f"no README quality row for {task} {who}"
        shown = [float(cell) for cell in row.group(1).split("|")]
        assert shown == [round(quality[who][key], 3) for key in columns]
    share = re.search(rf"^\| {task} \| (\d+) % \| (\d+) % \| (\d+) % \|$", readme, re.M)
    assert share, f"no README share row for {task}"
    ratios = quality["ratio_ours_to_released"]
    assert [int(v) for v in share.groups()] == [round(100 * ratios[key]) for key in ("VIF", "Qabf", "SSIM")]
