"""Our ReFusion and test.py reproduce the authors' release on their example pairs."""
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import REFERENCE, REFERENCE_STEMS, ROOT, needs_reference, reference_image, release_weights
from ReFusion import ReFusion
from utils.tasks import TASKS
from utils.image import read_rgb, to_ycrcb

pytestmark = needs_reference
CASES = [(task, stem) for task in TASKS for stem in REFERENCE_STEMS[task]]


@pytest.fixture(scope="module")
def release_models():
    models = {}
    for task in TASKS:
        model = ReFusion()
        # exactly what a user of the release writes (the files hold CUDA tensors, hence map_location)
        model.load_state_dict(torch.load(release_weights(task), map_location="cpu"))
        models[task] = model.eval()
    return models


@pytest.mark.parametrize("task,stem", CASES)
def test_raw_output_matches_release(release_models, task, stem):
    sources = [to_ycrcb(read_rgb(reference_image(task, which, stem)))[..., 0] / 255 for which in (0, 1)]
    x = torch.from_numpy(np.stack(sources)[None]).float()
    with torch.no_grad():
        fused = release_models[task](x)[0, 0].numpy()
    expected = np.load(os.path.join(REFERENCE, "official_outputs", f"{task}_{stem}.npy"))
    assert fused.shape == expected.shape
    assert np.abs(fused - expected).max() <= 1e-5


def read_png(path):
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


@pytest.mark.parametrize("task", list(TASKS))
def test_test_py_matches_release_pipeline(tmp_path, task):
    (first, second), stems = TASKS[task].test_cases, REFERENCE_STEMS[task]
    folder = os.path.join(REFERENCE, "test_cases", task)
    out = tmp_path / task
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "test.py"), "--task", task,
         "--img1", os.path.join(folder, first), "--img2", os.path.join(folder, second),
         "--model", release_weights(task), "--out", str(out), "--device", "cpu"],
        capture_output=True, text=True, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    for stem in stems:
        for kind in ("gray", "rgb"):
            expected = np.load(os.path.join(REFERENCE, "official_rgb", f"{task}_{stem}_{kind}.npz"))["data"]
            ours = read_png(str(out / ("Gray" if kind == "gray" else "RGB") / f"{stem}.png"))
            assert ours.dtype == np.uint8 and ours.shape == expected.shape
            assert np.abs(ours.astype(np.float64) - np.round(expected.astype(np.float64))).max() <= 1
