"""Out of space: every script stops with one ``error:`` line naming the file, leaves nothing
half-written, and a training run's last good checkpoint stays and resumes.

A full disk is simulated three ways: a file size limit (``RLIMIT_FSIZE`` with SIGXFSZ ignored,
so a write past it fails with EFBIG, as one past a full disk fails with ENOSPC), an ENOSPC raised
by the one function every atomic write goes through, and, where the tests run as root with
tmpfs, a real 200 KB file system.
"""
import errno
import os
import resource
import signal
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from conftest import ROOT, random_patch_file
from test_train import TINY, load_script

train_script = load_script("refusion_train_full_disk", "train.py")


def pairs_in(folder, count=3, size=(96, 128)):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
    for i in range(count):
        for name in ("a", "b"):
            cv2.imwrite(str(folder / name / f"p{i}.png"), rng.integers(0, 256, size, dtype=np.uint8))
    return folder / "a", folder / "b"


def limited(limit):
    """A child process that may write no file larger than ``limit`` bytes."""
    def set_up():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_up


def run_limited(args, limit):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          preexec_fn=limited(limit), env={**os.environ, "REFUSION_NO_REEXEC": "1"})


def errors_of(result):
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def test_test_py_names_the_file_and_leaves_no_half_pair(tmp_path):
    a, b = pairs_in(tmp_path)
    torch.save(__import__("ReFusion").ReFusion().state_dict(), tmp_path / "model.pth")
    out = tmp_path / "out"
    result = run_limited(["test.py", "--task", "IVIF", "--img1", str(a), "--img2", str(b), "--model",
                          str(tmp_path / "model.pth"), "--out", str(out), "--device", "cpu"], 4096)
    assert result.returncode == 1
    assert errors_of(result) == [f"error: File too large: {out / 'Gray' / 'p0.png'}"]
    assert not [name for name in os.listdir(out / "Gray")]  # no partial file either


def test_eval_py_leaves_no_empty_csv(tmp_path):
    a, b = pairs_in(tmp_path)
    result = run_limited(["eval.py", "--img1", str(a), "--img2", str(a), "--fused", str(b),
                          "--jobs", "1", "--csv", str(tmp_path / "scores.csv")], 200)
    assert result.returncode == 1
    assert errors_of(result) == [f"error: File too large: {tmp_path / 'scores.csv'}"]
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_img2patch_names_the_file_and_writes_nothing(tmp_path):
    a, b = pairs_in(tmp_path, count=4, size=(256, 256))
    out = tmp_path / "patches.h5"
    result = run_limited(["data/img2patch.py", "--img1", str(a), "--img2", str(b), "--out", str(out),
                          "--patch_size", "32", "--stride", "16"], 50_000)
    assert result.returncode == 1
    assert errors_of(result) == [f"error: File too large: {out}"]
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


@pytest.fixture(scope="module")
def patch_file(tmp_path_factory):
    return random_patch_file(tmp_path_factory.mktemp("full_disk") / "pairs.h5", 16, 32, seed=1)


def test_train_py_keeps_the_last_good_checkpoint_and_resumes(patch_file, tmp_path, monkeypatch, capsys):
    """The disk fills while epoch 2's checkpoint is written: one error line naming it, epoch 1's
    checkpoint.pt still there and whole, and the run resumes from it to the end."""
    import utils.atomic
    args = TINY + ["--data", str(patch_file), "--exp_dir", str(tmp_path)]
    real_write, checkpoints = utils.atomic.write_atomic, []

    def disk_fills(path, write):
        if path.endswith("checkpoint.pt"):
            checkpoints.append(path)
            if len(checkpoints) == 2:  # half the file reaches the disk, then it is full

                def write(temporary, write=write):
                    with open(temporary, "wb") as stream:
                        stream.write(b"\0" * 1000)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, write)

    monkeypatch.setattr(utils.atomic, "write_atomic", disk_fills)
    assert train_script.main(args) == 1
    err = capsys.readouterr().err
    run_dir = os.path.dirname(checkpoints[0])
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        f"error: No space left on device: {checkpoints[0]}"]
    assert "Traceback" not in err and not [n for n in os.listdir(run_dir) if n.endswith(".partial")]
    state = torch.load(checkpoints[0], weights_only=True)
    assert state["epoch"] == 1 and state["stage"] == "meta" and state["step"] == 0
    monkeypatch.setattr(utils.atomic, "write_atomic", real_write)
    assert train_script.main(["--resume", checkpoints[0]]) == 0
    assert torch.load(checkpoints[0], weights_only=True)["epoch"] == 2
    assert os.path.isfile(os.path.join(run_dir, "ReFusion_epoch2.pth"))
    # epoch 2's first log row went with its checkpoint: one row per epoch
    assert [line.split(",")[0] for line in open(os.path.join(run_dir, "log.csv")).read().splitlines()] == [
        "epoch", "1", "2"]


def test_train_py_on_a_file_size_limit_is_one_line(patch_file, tmp_path):
    result = run_limited(["train.py", *TINY, "--data", str(patch_file), "--exp_dir", str(tmp_path)], 100_000)
    assert result.returncode == 1
    (line,) = errors_of(result)
    assert line.startswith("error: File too large: ") and line.endswith(".pth")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_real_small_file_system(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("tmpfs cannot be mounted here")
    try:
        a, b = pairs_in(tmp_path / "in", count=4, size=(256, 256))
        out = disk / "patches.h5"
        result = subprocess.run([sys.executable, "data/img2patch.py", "--img1", str(a), "--img2", str(b),
                                 "--out", str(out), "--patch_size", "32", "--stride", "8"],
                                cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 1
        assert errors_of(result) == [f"error: No space left on device: {out}"]
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
