"""The four fusion tasks and the folder names of their two sources.

``test_cases``: the sub-folders of ``test_cases/<TASK>/`` (the release's names);
``dataset``: those of a ``<TASK>/{train,test}/`` dataset folder as ``data/img2patch.py`` and the
quality tools read it (see docs/DATASETS.md).
"""
from collections import namedtuple

SourceFolders = namedtuple("SourceFolders", "test_cases dataset")

TASKS = {
    "IVIF": SourceFolders(test_cases=("infrared", "visible"), dataset=("ir", "vi")),
    "MIF": SourceFolders(test_cases=("CT_PET_SPECT", "MRI"), dataset=("CT_PET_SPECT", "MRI")),
    "MFIF": SourceFolders(test_cases=("near", "far"), dataset=("A", "B")),
    "MEIF": SourceFolders(test_cases=("under", "over"), dataset=("under", "over")),
}
