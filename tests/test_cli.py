"""test.py end to end on small generated pairs: outputs, and one-line errors for bad input."""
import importlib.util
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import ROOT
from ReFusion import ReFusion
from utils.tasks import TASKS

spec = importlib.util.spec_from_file_location("refusion_test_script", os.path.join(ROOT, "test.py"))
test_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(test_script)


@pytest.fixture
def workspace(tmp_path):
    torch.manual_seed(0)
    torch.save(ReFusion().state_dict(), tmp_path / "model.pth")
    rng = np.random.default_rng(0)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    cv2.imwrite(str(tmp_path / "a" / "p1.png"), rng.integers(0, 256, (20, 24), dtype=np.uint8))
    cv2.imwrite(str(tmp_path / "b" / "p1.jpg"), rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    cv2.imwrite(str(tmp_path / "a" / "p2.bmp"), rng.integers(0, 256, (16, 16), dtype=np.uint8))
    cv2.imwrite(str(tmp_path / "b" / "p2.png"), rng.integers(0, 256, (16, 16), dtype=np.uint8))
    return tmp_path


def run(workspace, *extra, img1="a", img2="b", model="model.pth", out="out"):
    args = ["--task", "IVIF", "--device", "cpu"]
    for flag, value in (("--img1", img1), ("--img2", img2), ("--model", model), ("--out", out)):
        args += [flag, str(workspace / value)]
    return test_script.main(args + list(extra))


def test_fuses_folders_with_grey_and_colour_outputs(workspace):
    assert run(workspace) == 0
    grey = cv2.imread(str(workspace / "out" / "Gray" / "p1.png"), cv2.IMREAD_UNCHANGED)
    assert grey.shape == (20, 24) and grey.dtype == np.uint8
    assert grey.min() == 0 and grey.max() == 255  # min-max stretched
    assert cv2.imread(str(workspace / "out" / "RGB" / "p1.png")).shape == (20, 24, 3)
    assert os.path.exists(workspace / "out" / "Gray" / "p2.png")
    assert not os.path.exists(workspace / "out" / "RGB" / "p2.png")  # both sources grey


def test_single_file_pair(workspace):
    assert run(workspace, img1="a/p2.bmp", img2="b/p2.png") == 0
    assert os.listdir(workspace / "out" / "Gray") == ["p2.png"]


def test_constant_sources_do_not_divide_by_zero(workspace):
    for folder in ("a", "b"):
        cv2.imwrite(str(workspace / folder / "p2.png" if folder == "b" else workspace / folder / "p2.bmp"),
                    np.full((16, 16), 128, np.uint8))
    assert run(workspace, img1="a/p2.bmp", img2="b/p2.png") == 0
    grey = cv2.imread(str(workspace / "out" / "Gray" / "p2.png"), cv2.IMREAD_UNCHANGED)
    assert grey.shape == (16, 16)


def expect_error(capsys, code, *fragments):
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # beside: progress bars
    assert len(errors) == 1
    err = errors[0]
    for fragment in fragments:
        assert fragment in err
    return err


def test_missing_model(workspace, capsys):
    expect_error(capsys, run(workspace, model="none.pth"), "none.pth", "train.py")


def test_missing_folder(workspace, capsys):
    expect_error(capsys, run(workspace, img2="nowhere"), "nowhere")


def test_unpaired_files_are_listed(workspace, capsys):
    cv2.imwrite(str(workspace / "a" / "extra.png"), np.zeros((4, 4), np.uint8))
    expect_error(capsys, run(workspace), "unpaired", "extra")


def test_size_mismatch_names_the_pair(workspace, capsys):
    cv2.imwrite(str(workspace / "b" / "p2.png"), np.zeros((17, 16), np.uint8))
    expect_error(capsys, run(workspace), "p2: size mismatch", "p2.bmp", "p2.png")


def test_unreadable_image(workspace, capsys):
    (workspace / "b" / "p2.png").write_bytes(b"garbage")
    expect_error(capsys, run(workspace), "p2: cannot read image", "p2.png")


def test_a_bad_pair_among_good_ones_is_named_and_the_others_fused(workspace, capsys):
    """Like convert or rsync: every pair is checked before the first is fused, every good one is
    fused (also those sorted after the bad one), each bad one gets an error line, a closing line
    counts them, and the exit status is 1."""
    for stem in ("p0", "p3"):
        for folder in ("a", "b"):
            cv2.imwrite(str(workspace / folder / f"{stem}.png"), np.full((12, 14), 90, np.uint8))
    (workspace / "b" / "p2.png").write_bytes(b"truncated")
    assert run(workspace) == 1
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        f"error: p2: cannot read image {workspace / 'b' / 'p2.png'}: not a supported image file or corrupt"]
    assert f"IVIF: fused 3 of 4 pairs (1 in colour), 1 failed -> {workspace / 'out'}" in out
    assert sorted(os.listdir(workspace / "out" / "Gray")) == ["p0.png", "p1.png", "p3.png"]


def test_a_folder_bad_throughout_writes_nothing(workspace, capsys):
    for folder, name in (("a", "p1.png"), ("a", "p2.bmp")):
        (workspace / folder / name).write_bytes(b"")
    assert run(workspace) == 1
    err = capsys.readouterr().err
    assert err.count("error: ") == 2 and not (workspace / "out").exists()


def test_a_read_only_output_folder_is_found_before_any_work(workspace, capsys, monkeypatch):
    """The folder is tried before the model loads or any pair is fused (a read-only file system
    is simulated: root writes anywhere on a normal one)."""
    import errno
    import tempfile

    def read_only(dir=None, **_):
        raise OSError(errno.EROFS, "Read-only file system", os.path.join(dir, "tmpxyz"))

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    err = expect_error(capsys, run(workspace), f"cannot write to {workspace / 'out' / 'Gray'}: Read-only file system")
    assert "tmpxyz" not in err and not os.listdir(workspace / "out" / "Gray")


def test_corrupt_checkpoint(workspace, capsys):
    (workspace / "model.pth").write_bytes(b"\x00" * 64)
    expect_error(capsys, run(workspace), "cannot read checkpoint", "model.pth")


def test_checkpoint_of_another_network(workspace, capsys):
    torch.save({"weight": torch.zeros(3)}, workspace / "model.pth")
    expect_error(capsys, run(workspace), "model.pth", "does not hold ReFusion weights")


def test_refuses_to_write_into_an_input_folder(workspace, capsys):
    before = sorted(os.listdir(workspace / "a"))
    expect_error(capsys, run(workspace, out="a"), "input folder")
    expect_error(capsys, run(workspace, out="a/Gray/.."), "input folder")
    assert sorted(os.listdir(workspace / "a")) == before


def test_output_path_that_is_a_file(workspace, capsys):
    (workspace / "taken").write_text("a file, not a folder")
    expect_error(capsys, run(workspace, out="taken"), "taken")
    assert (workspace / "taken").read_text() == "a file, not a folder"


def test_all_tasks_with_explicit_paths_is_refused(capsys):
    expect_error(capsys, test_script.main(["--img1", "x"]), "single --task")


def test_unknown_device(workspace, capsys):
    expect_error(capsys, run(workspace, "--device", "tpu"), "unknown device")


def test_all_tasks_fuses_those_with_a_model_and_names_the_others(tmp_path):
    """A copy of the project with test cases for every task but a model for IVIF only."""
    os.symlink(os.path.join(ROOT, "ReFusion.py"), tmp_path / "ReFusion.py")
    os.symlink(os.path.join(ROOT, "utils"), tmp_path / "utils")
    (tmp_path / "test.py").write_text(open(os.path.join(ROOT, "test.py")).read())
    rng = np.random.default_rng(0)
    for task, folders in TASKS.items():
        first, second = folders.test_cases
        for folder in (first, second):
            os.makedirs(tmp_path / "test_cases" / task / folder)
            cv2.imwrite(str(tmp_path / "test_cases" / task / folder / "x.png"),
                        rng.integers(0, 256, (12, 12), dtype=np.uint8))
    os.makedirs(tmp_path / "models")
    torch.save(ReFusion().state_dict(), tmp_path / "models" / "ReFusion_IVIF.pth")
    result = subprocess.run([sys.executable, "test.py"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert os.path.exists(tmp_path / "test_results" / "IVIF" / "Gray" / "x.png")
    assert not os.path.exists(tmp_path / "test_results" / "MIF")
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no model for MIF, MFIF, MEIF")


def test_default_run_says_what_is_missing_without_traceback(tmp_path):
    """A fresh copy of test.py alone: no bundled models or test cases next to it."""
    os.symlink(os.path.join(ROOT, "ReFusion.py"), tmp_path / "ReFusion.py")
    os.symlink(os.path.join(ROOT, "utils"), tmp_path / "utils")
    (tmp_path / "test.py").write_text(open(os.path.join(ROOT, "test.py")).read())
    result = subprocess.run([sys.executable, "test.py"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "models/ReFusion_IVIF.pth" in result.stderr and "test_cases/IVIF/infrared" in result.stderr


@pytest.mark.parametrize("task", list(TASKS))
def test_shipped_model_fuses_the_bundled_test_cases(task, tmp_path):
    """Every task ships weights that load strictly and fuse its bundled pairs into non-flat images."""
    first, second = TASKS[task].test_cases
    cases = os.path.join(ROOT, "test_cases", task)
    assert test_script.main(["--task", task, "--img1", os.path.join(cases, first), "--img2",
                             os.path.join(cases, second), "--out", str(tmp_path)]) == 0
    stems = sorted(os.path.splitext(name)[0] for name in os.listdir(os.path.join(cases, first)))
    assert sorted(os.path.splitext(name)[0] for name in os.listdir(tmp_path / "Gray")) == stems
    for name in os.listdir(tmp_path / "Gray"):
        fused = cv2.imread(str(tmp_path / "Gray" / name), cv2.IMREAD_UNCHANGED)
        assert fused.dtype == np.uint8 and fused.std() > 5


def test_a_training_checkpoint_points_at_the_weights_beside_it(workspace, capsys):
    torch.save({"config": {}, "epoch": 3, "fusion": ReFusion().state_dict()}, workspace / "checkpoint.pt")
    assert run(workspace, model="checkpoint.pt") == 1
    err = capsys.readouterr().err
    assert "train.py's checkpoint of a whole run" in err and str(workspace / "ReFusion.pth") in err
    assert err.count("\n") == 1


def test_a_truncated_checkpoint_is_one_whole_sentence(workspace, capsys):
    data = (workspace / "model.pth").read_bytes()
    (workspace / "cut.pth").write_bytes(data[:len(data) // 2])
    assert run(workspace, model="cut.pth") == 1
    err = capsys.readouterr().err.strip()
    assert "truncated or corrupt (" in err and err.endswith(")") and "your checkpoint file is" not in err


@pytest.mark.parametrize("script", ["train.py", "test.py", "eval.py", "data/img2patch.py"])
def test_every_option_is_described_with_its_default(script):
    """``--help`` describes each flag (its help text is more than the flag's metavar) and names
    its default; train.py also lists what each preset sets."""
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "REFUSION_NO_REEXEC": "1"}).stdout
    options = [line.split()[0] for line in out.splitlines() if line.startswith("  --")]
    assert len(options) >= 5
    body = out[out.index("options:"):]
    for option in options:
        entry = body.split(f"  {option}", 1)[1].split("\n  --", 1)[0]
        assert "default" in entry and len(entry.split()) > 3, (script, option, entry)
    if script == "train.py":
        assert "presets: cpu: epochs=6, crop=64" in out and "lr=0.0002, lr_step=4" in out

