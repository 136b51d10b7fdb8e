import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHARED = os.environ.get("REFUSION_SHARED", os.path.join(ROOT, "..", "shared"))
REFERENCE = os.path.join(SHARED, "reference")
TASKS = ("IVIF", "MIF", "MFIF", "MEIF")
# (first folder, second folder, stems) of the authors' example pairs in reference/test_cases
REFERENCE_CASES = {"IVIF": ("infrared", "visible", ("00710N", "00906N")),
                   "MIF": ("CT_PET_SPECT", "MRI", ("MRI_PET_14", "MRI_PET_37")),
                   "MFIF": ("near", "far", ("14", "5")),
                   "MEIF": ("under", "over", ("AirBellowsGap", "ICCV_03"))}

needs_reference = pytest.mark.skipif(
    not os.path.isdir(REFERENCE),
    reason=f"reference material not found at {REFERENCE} (set REFUSION_SHARED to the shared folder)")


def reference_image(task, which, stem):
    folder = os.path.join(REFERENCE, "test_cases", task, REFERENCE_CASES[task][which])
    return next(os.path.join(folder, n) for n in os.listdir(folder) if os.path.splitext(n)[0] == stem)


def release_weights(task):
    return os.path.join(REFERENCE, "official_weights", f"ReFusion_{task}.pth")
