"""The shipped models and their records agree: weights, models/<TASK>.json and README's quality table."""
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, needs_reference, random_patch_file, release_weights
from test_train import train_script
from ReFusion import ReFusion
from tools.diagnostics.loss_optimum import intensity_weights, loss_optimum
from tools.diagnostics.stripes import alternation_table, border_alternation, bundled_pairs
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


# keys that say where and how a run was driven, not what it trained
RUN_ONLY = train_script.HOW_TO_RUN + ("exp_dir", "resume")


@pytest.mark.parametrize("task", list(TASKS))
def test_record_command_trains_the_recorded_config(task):
    """The record's ``train.py`` command, run under today's defaults, trains the config the model
    was trained with: a default that changed since the model was trained is spelled out in it."""
    info = record(task)
    command = next(c for c in info["commands"] if c.startswith("python train.py"))
    given = train_script.parse_config(shlex.split(command)[2:])
    trained = train_script.saved_config(info["config"])
    assert {k: given.get(k) for k in trained if k not in RUN_ONLY} == \
        {k: v for k, v in trained.items() if k not in RUN_ONLY}


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


def test_border_alternation_sees_striped_borders_only():
    """The stripe measure: a line standing out from both neighbours scores its depth; a ramp, a
    border brightening toward the edge and a line further in score 0."""
    ramp = np.tile(np.arange(64, dtype=np.float64), (48, 1)) * 0.5  # 0.5 levels a column
    assert border_alternation(ramp) == 0
    brightening = ramp + (40.0 / (1 + np.arange(48)))[:, None]  # 40, 20, 13.3, ... down the rows
    assert border_alternation(brightening) == 0
    striped = ramp.copy()
    striped[1] -= 30  # row 1 dark between rows 0 and 2
    striped[3] -= 12
    assert border_alternation(striped) == pytest.approx(30)
    inner = ramp.copy()
    inner[10] -= 30
    assert border_alternation(inner) == 0
    columns = ramp.copy()
    columns[:, -2] += 7.25  # a bright column next to the right edge
    assert border_alternation(columns) == pytest.approx(7.25 - 0.5)


@pytest.mark.parametrize("target, padding, striped", [("max", "zero", True), ("max", "replicate", False),
                                                    ("weighted", "zero", False)])
def test_the_max_terms_zero_padded_border_step_asks_for_stripes(target, padding, striped):
    """On smooth sources of different brightness with equal intensity weights, the fusion loss's
    own optimum (no network) zig-zags at the border under the max term with zero-padded Sobel
    maps: its target at the border is the brighter source's step from the padding, where the
    intensity term asks for the mean. Replicate padding, or the weighted term, asks for none."""
    y, x = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    sources = torch.stack([0.3 + 0.1 * torch.sin(x / 5) * torch.cos(y / 7), 0.6 + 0.1 * torch.cos(x / 6 + y / 9)])[None]
    assert max(border_alternation(255 * s.numpy()) for s in sources[0]) < 0.1
    fused = loss_optimum(sources, intensity_weights(sources, "equal"), target, padding, iterations=500)
    depth = border_alternation(fused[0].numpy())
    assert depth > 5 if striped else depth < 1, depth


def test_loss_optimum_command_prints_every_term_padding_and_weighting(tmp_path):
    data = random_patch_file(str(tmp_path / "patches.h5"), 3, 16, seed=0)
    done = subprocess.run([sys.executable, "-m", "tools.diagnostics.loss_optimum", "--data", data, "--pairs", "2",
                           "--iterations", "5"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| max") or line.startswith("| weighted")]
    assert len(rows) == 12
    missing = subprocess.run([sys.executable, "-m", "tools.diagnostics.loss_optimum", "--data", str(tmp_path / "no.h5")],
                             cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode != 0 and missing.stderr.startswith("error:") and "no.h5" in missing.stderr


@needs_reference
@pytest.mark.parametrize("task", TASKS)
def test_shipped_borders_alternate_no_more_than_released(task):
    """On every bundled pair, the shipped model's outer lines zig-zag no more than the released
    weights' (tools/diagnostics/stripes.py)."""
    table = alternation_table([("released", release_weights(task)),
                               ("shipped", os.path.join(ROOT, "models", f"ReFusion_{task}.pth"))],
                              bundled_pairs(task))
    for pair, released in table["released"].items():
        assert table["shipped"][pair] <= released, (task, pair, table)
