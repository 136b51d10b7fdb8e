"""The shipped models and their records agree: weights, models/<TASK>.json and README's quality table."""
import hashlib
import json
import os
import re

import pytest
import torch

from conftest import ROOT
from ReFusion import ReFusion
from utils.tasks import TASKS


def record(task):
    with open(os.path.join(ROOT, "models", f"{task}.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("task", list(TASKS))
def test_record_describes_the_shipped_weights(task):
    info = record(task)
    path = os.path.join(ROOT, "models", f"ReFusion_{task}.pth")
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == info["weights_sha256"]
    ReFusion().load_state_dict(torch.load(path, map_location="cpu"))  # strict: every key, every shape
    assert info["task"] == info["config"]["task"] == task
    assert "never from released weights" in info["initialised_from"] and info["data"]["split"] == "train only"
    assert any(command.startswith("python train.py") for command in info["commands"])


@pytest.mark.parametrize("task", list(TASKS))
def test_readme_quality_row_is_the_recorded_scores(task):
    """README's quality table repeats models/<TASK>.json: VIF, Qabf, SSIM of ours and of the
    released weights, and ours as a share of theirs."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    quality = record(task)["quality"]
    row = re.search(rf"^\| {task} \| {quality['pairs']} \|(.*)\|$", readme, re.M)
    assert row, f"no README quality row for {task}"
    cells = [cell.strip() for cell in row.group(1).split("|")]
    metrics = ("VIF", "Qabf", "SSIM")
    for cell, key in zip(cells[:3], metrics):
        assert [float(v) for v in cell.split(" / ")] == [round(quality[w][key], 3) for w in ("ours", "released")]
    shares = [int(v) for v in cells[3].rstrip(" %").split(" / ")]
    assert shares == [round(100 * quality["ratio_ours_to_released"][key]) for key in metrics]
