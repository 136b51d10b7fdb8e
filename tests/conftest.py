import os

import pytest

from utils.tasks import TASKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHARED = os.environ.get("REFUSION_SHARED", os.path.join(ROOT, "..", "shared"))
REFERENCE = os.path.join(SHARED, "reference")
# the stems of the authors' example pairs in reference/test_cases/<TASK>/<test_cases folders>
REFERENCE_STEMS = {"IVIF": ("00710N", "00906N"), "MIF": ("MRI_PET_14", "MRI_PET_37"),
                   "MFIF": ("14", "5"), "MEIF": ("AirBellowsGap", "ICCV_03")}

needs_reference = pytest.mark.skipif(
    not os.path.isdir(REFERENCE),
    reason=f"reference material not found at {REFERENCE} (set REFUSION_SHARED to the shared folder)")


def reference_image(task, which, stem):
    folder = os.path.join(REFERENCE, "test_cases", task, TASKS[task].test_cases[which])
    return next(os.path.join(folder, n) for n in os.listdir(folder) if os.path.splitext(n)[0] == stem)


def release_weights(task):
    return os.path.join(REFERENCE, "official_weights", f"ReFusion_{task}.pth")


def random_patch_file(path, count, size, seed):
    """An img2patch-style ``.h5`` of ``count`` random ``size`` px patch pairs; returns ``path``."""
    import h5py
    import numpy as np
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as store:
        for name in ("img1", "img2"):
            store[name] = rng.integers(0, 256, (count, 1, size, size), dtype=np.uint8)
    return path
