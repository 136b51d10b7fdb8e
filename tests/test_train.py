"""img2patch -> train.py -> test.py end to end, resume equals an uninterrupted run, errors."""
import csv
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import cv2
import h5py
import numpy as np
import pytest
import torch

from conftest import ROOT


def load_script(name, path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


img2patch = load_script("refusion_img2patch", "data/img2patch.py")
train_script = load_script("refusion_train", "train.py")
test_script = load_script("refusion_test_script_t", "test.py")


def ship(args):
    """``python -m tools.ship_model ARGS``'s exit code."""
    return subprocess.run([sys.executable, "-m", "tools.ship_model", *args], cwd=ROOT,
                          capture_output=True).returncode


@pytest.fixture(scope="module")
def patches(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    for folder in ("a", "b"):
        (root / folder).mkdir()
    yy, xx = np.mgrid[0:48, 0:56]
    for i in range(3):
        scene = 127 + 100 * np.sin(xx / (3 + i)) * np.cos(yy / 5)
        cv2.imwrite(str(root / "a" / f"s{i}.png"), np.clip(scene + rng.normal(0, 5, scene.shape), 0, 255).astype(np.uint8))
        cv2.imwrite(str(root / "b" / f"s{i}.png"), np.clip(255 - scene, 0, 255).astype(np.uint8))
    cv2.imwrite(str(root / "a" / "small.png"), np.zeros((20, 20), np.uint8))
    cv2.imwrite(str(root / "b" / "small.png"), np.zeros((20, 20), np.uint8))
    out = root / "train.h5"
    assert img2patch.main(["--img1", str(root / "a"), "--img2", str(root / "b"), "--out", str(out),
                           "--patch_size", "32", "--stride", "12"]) == 0
    return root, out


def test_img2patch_layout(patches, capsys):
    root, out = patches
    with h5py.File(out) as store:
        assert store["img1"].dtype == np.uint8 and store["img1"].shape[1:] == (1, 32, 32)
        assert store["img1"].shape == store["img2"].shape
        assert store.attrs["count"] == len(store["img1"]) == 3 * 2 * 3  # 3 images x 2 rows x 3 columns
        assert store.attrs["patch_size"] == 32 and store.attrs["stride"] == 12
        assert store.attrs["images"] == 3  # the 20x20 pair is skipped
    assert img2patch.main(["--img1", str(root / "a"), "--img2", str(root / "b"), "--out", str(out)]) == 1
    assert "exists" in capsys.readouterr().err  # never overwrites


def test_img2patch_errors(tmp_path, capsys):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    assert img2patch.main(["--img1", str(tmp_path / "a"), "--img2", str(tmp_path / "b"),
                           "--out", str(tmp_path / "x.h5")]) == 1
    assert "no image" in capsys.readouterr().err
    cv2.imwrite(str(tmp_path / "a" / "p.png"), np.zeros((40, 40), np.uint8))
    cv2.imwrite(str(tmp_path / "b" / "q.png"), np.zeros((40, 40), np.uint8))
    assert img2patch.main(["--img1", str(tmp_path / "a"), "--img2", str(tmp_path / "b"),
                           "--out", str(tmp_path / "x.h5")]) == 1
    assert "unpaired" in capsys.readouterr().err


TINY = ["--epochs", "2", "--batch_size", "2", "--max_meta_step", "3", "--accumulation_steps", "2",
        "--max_fusion_steps", "4", "--crop", "24", "--lr", "1e-3", "--lr_step", "1", "--device", "cpu"]


def weights(run_dir):
    return {name: torch.load(os.path.join(run_dir, f"{name}.pth")) for name in ("ReFusion", "LPN", "ReN")}


def interrupt_at_meta_pair(monkeypatch, count):
    """Ctrl-C (a real SIGINT to this process) once the ``count``-th meta pair of the next run
    starts; with TINY's 3 pairs per epoch, 4 stops epoch 2's stage 1 after its first pair.
    Returns the original ``lpn_meta_gradient`` to put back before resuming."""
    calls, original = {"n": 0}, train_script.lpn_meta_gradient

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == count:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*a, **k)

    monkeypatch.setattr(train_script, "lpn_meta_gradient", interrupt)
    return original


def test_train_then_fuse_and_resume_is_bit_exact(patches, tmp_path, monkeypatch):
    _, data = patches
    args = TINY + ["--data", str(data)]
    full_dir, finished, _ = train_script.train(args + ["--exp_dir", str(tmp_path / "full")])
    assert finished
    files = set(os.listdir(full_dir))
    assert {"config.json", "log.csv", "checkpoint.pt", "ReFusion.pth", "LPN.pth", "ReN.pth",
            "ReFusion_epoch1.pth", "ReFusion_epoch2.pth", "samples_epoch2.png"} <= files
    assert len(open(os.path.join(full_dir, "log.csv")).read().strip().splitlines()) == 3

    # the trained weights fuse with test.py
    pair_dir = tmp_path / "pair"
    pair_dir.mkdir()
    cv2.imwrite(str(pair_dir / "a.png"), np.full((16, 16), 30, np.uint8))
    cv2.imwrite(str(pair_dir / "b.png"), np.full((16, 16), 200, np.uint8))
    assert test_script.main(["--task", "MEIF", "--img1", str(pair_dir / "a.png"), "--img2",
                             str(pair_dir / "b.png"), "--model", os.path.join(full_dir, "ReFusion.pth"),
                             "--out", str(tmp_path / "fused")]) == 0

    # interrupted in epoch 2 during stage 1 (after the first of two accumulated pairs), then resumed
    original = interrupt_at_meta_pair(monkeypatch, 4)
    part_dir, finished, _ = train_script.train(args + ["--exp_dir", str(tmp_path / "part")])
    assert not finished
    models = tmp_path / "models"
    assert ship(["--run", part_dir, "--models", str(models)]) == 1  # unfinished runs are refused
    assert not models.exists()
    assert ship(["--run", part_dir, "--models", str(models), "--epoch", "2"]) == 1
    assert ship(["--run", part_dir, "--models", str(models), "--epoch", "1"]) == 0
    assert json.load(open(models / "IVIF.json"))["steps"]["epochs"] == 1
    state = torch.load(os.path.join(part_dir, "checkpoint.pt"), weights_only=True)
    assert (state["epoch"], state["stage"], state["step"]) == (1, "meta", 1)
    assert state["lpn_grads"] is not None  # mid-accumulation gradients are kept
    monkeypatch.setattr(train_script, "lpn_meta_gradient", original)
    resumed_dir, finished, _ = train_script.train(["--resume", os.path.join(part_dir, "checkpoint.pt")])
    assert finished and resumed_dir == part_dir
    full, resumed = weights(full_dir), weights(part_dir)
    for name in full:
        assert all(torch.equal(full[name][k], resumed[name][k]) for k in full[name]), name
    assert open(os.path.join(full_dir, "log.csv")).read().split("\n")[0] == \
        open(os.path.join(part_dir, "log.csv")).read().split("\n")[0]

    # shipping: weights copied unchanged, record written; the bit-exact resumed run ships over it
    # without --force, a different run needs it
    assert ship(["--run", full_dir, "--models", str(models), "--command", "python train.py", "--force"]) == 0
    shipped = torch.load(models / "ReFusion_IVIF.pth")
    assert all(torch.equal(shipped[k], full["ReFusion"][k]) for k in full["ReFusion"])
    record = json.load(open(models / "IVIF.json"))
    assert record["commands"] == ["python train.py"] and record["steps"]["total_fusion_steps"] == 8
    assert record["data"]["count"] == 18 and len(record["per_epoch_log"]) == 2
    assert ship(["--run", part_dir, "--models", str(models)]) == 0
    other_dir, _, _ = train_script.train(args + ["--exp_dir", str(tmp_path / "other"), "--seed", "1"])
    assert ship(["--run", other_dir, "--models", str(models)]) == 1
    assert ship(["--run", other_dir, "--models", str(models), "--force"]) == 0


def test_max_time_stops_with_exit_0_and_a_checkpoint_that_resumes(patches, tmp_path, capsys):
    _, data = patches
    args = TINY + ["--data", str(data), "--exp_dir", str(tmp_path)]
    assert train_script.main(args + ["--max_time", "0.001s"]) == 0
    err = capsys.readouterr().err
    assert "--max_time 0.001s reached; saved" in err and "python train.py --resume" in err
    run_dir = str(next(tmp_path.iterdir()))
    state = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    # the first step boundary after 1 ms: before step 1 or, on a quick start, step 2
    assert (state["epoch"], state["stage"]) == (0, "meta") and state["step"] <= 1
    assert not os.path.exists(os.path.join(run_dir, "log.csv"))
    # the limit is for this command only: the resumed run takes its own (none here) and finishes
    time.sleep(1.5)  # between the stretches: not part of the epoch's wall time
    assert train_script.main(["--resume", os.path.join(run_dir, "checkpoint.pt")]) == 0
    assert os.path.exists(os.path.join(run_dir, "ReFusion_epoch2.pth"))
    with open(os.path.join(run_dir, "log.csv")) as log:
        seconds = [float(row["seconds"]) for row in csv.DictReader(log)]
    assert state["sums"]["seconds"] > 0 and seconds[0] >= state["sums"]["seconds"]  # both stretches
    assert train_script.main(args + ["--max_time", "soon"]) == 1
    assert "--max_time: cannot read duration 'soon'" in capsys.readouterr().err


@pytest.mark.parametrize("text, seconds", [("150m", 9000), ("2h30m", 9000), ("5400", 5400),
                                           ("90s", 90), ("1.5h", 5400), ("", 0), ("0", 0)])
def test_durations(text, seconds):
    from utils.runtime import parse_duration
    assert parse_duration(text) == seconds


# long enough (about 60 steps) for a signal to land mid-run
SLOW = ["--epochs", "4", "--batch_size", "2", "--max_meta_step", "6", "--accumulation_steps", "2",
        "--crop", "24", "--lr", "1e-3", "--lr_step", "2", "--device", "cpu", "--threads", "1"]


def start_run(args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + args, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(process, exp_dir):
    """Block until the run's first checkpoint.pt exists (it is then between steps)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        found = list(exp_dir.glob("*/checkpoint.pt"))
        if found:
            return os.path.dirname(found[0])
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint.pt appeared: {process.communicate()}")


def test_sigterm_and_sigkill_lose_nothing_that_resume_cannot_redo(patches, tmp_path):
    """SIGTERM saves at the next step boundary (exit 143); SIGKILL leaves the last periodic
    checkpoint. Both resume to weights equal to an uninterrupted run's, bit for bit."""
    _, data = patches
    args = SLOW + ["--data", str(data), "--checkpoint_every", "0.2s"]
    reference = start_run(args + ["--exp_dir", str(tmp_path / "full")])
    assert reference.wait(timeout=300) == 0, reference.communicate()
    full = weights(next((tmp_path / "full").iterdir()))

    for how in ("SIGTERM", "SIGKILL"):
        exp_dir = tmp_path / how
        process = start_run(args + ["--exp_dir", str(exp_dir)])
        run_dir = wait_for_checkpoint(process, exp_dir)
        process.send_signal(getattr(signal, how))
        _, err = process.communicate(timeout=120)
        if how == "SIGTERM":
            assert process.returncode == 128 + signal.SIGTERM and "continue with" in err, err
        else:
            assert process.returncode == -signal.SIGKILL
        assert not os.path.exists(os.path.join(run_dir, "ReFusion_epoch4.pth"))  # stopped mid-run
        assert not [n for n in os.listdir(run_dir) if n.endswith(".partial")]
        resumed = start_run(["--resume", os.path.join(run_dir, "checkpoint.pt"), "--threads", "1"])
        assert resumed.wait(timeout=300) == 0, resumed.communicate()
        again = weights(run_dir)
        for name in full:
            assert all(torch.equal(full[name][k], again[name][k]) for k in full[name]), (how, name)


def test_lpn_lr_sets_the_size_of_ps_normalised_step(patches, tmp_path):
    """One epoch with one update of P: its largest parameter change is exactly ``lpn_lr``
    (the step is ``lpn_lr * g / max|g|``), and stage 2 does not move P."""
    _, data = patches
    args = TINY + ["--data", str(data), "--epochs", "1", "--max_meta_step", "2", "--lpn_lr", "0.25"]
    config = train_script.parse_config(args + ["--exp_dir", str(tmp_path / "init")])
    initial = {k: v.clone() for k, v in train_script.Trainer(config, str(tmp_path)).lpn.state_dict().items()}
    run_dir, finished, _ = train_script.train(args + ["--exp_dir", str(tmp_path / "run")])
    assert finished
    trained = weights(run_dir)["LPN"]
    largest = max((trained[k] - initial[k]).abs().max().item() for k in initial)
    assert largest == pytest.approx(0.25, rel=1e-5)


def test_lpn_lr_step_decays_p_alone(patches, tmp_path):
    """``--lpn_lr_step 1`` with ``--lr_step 5``: P's one update of epoch 2 is a tenth of epoch 1's,
    while F's rate (log.csv) stays at lr."""
    _, data = patches
    args = TINY + ["--data", str(data), "--max_meta_step", "2", "--lpn_lr", "0.25", "--lpn_lr_step", "1",
                   "--lr_step", "5", "--exp_dir", str(tmp_path)]
    run_dir, finished, _ = train_script.train(args)
    assert finished
    lpn = [torch.load(os.path.join(run_dir, f"LPN_epoch{e}.pth")) for e in (1, 2)]
    largest = max((lpn[1][k] - lpn[0][k]).abs().max().item() for k in lpn[0])
    assert largest == pytest.approx(0.025, rel=1e-4)
    with open(os.path.join(run_dir, "log.csv")) as log:
        assert [float(row["lr"]) for row in csv.DictReader(log)] == [1e-3, 1e-3]


@pytest.mark.parametrize("key, field", [("symmetric_lpn", "symmetric_proposals"),
                                        ("lpn_fusion_loss", "lpn_fusion_loss")])
def test_boolean_flags_reach_the_losses(patches, tmp_path, capsys, key, field):
    _, data = patches
    for text, value in (("true", True), ("0", False), ("No", False)):
        config = train_script.parse_config(["--data", str(data), f"--{key}", text])
        assert config[key] is value
        assert getattr(train_script.loss_weights_at(config, 0), field) is value
    with pytest.raises(SystemExit):
        train_script.parse_config([f"--{key}", "maybe"])
    assert "expected true or false, got 'maybe'" in capsys.readouterr().err


def test_grad_ramp_switches_the_gradient_weights_growth(patches):
    """The paper's ramp c_grad * (e+1)/E by default; ``--grad_ramp false`` holds c_grad from epoch 1."""
    _, data = patches
    ramped = train_script.parse_config(["--data", str(data), "--epochs", "4", "--c_grad", "2"])
    constant = train_script.parse_config(["--data", str(data), "--epochs", "4", "--c_grad", "2",
                                          "--grad_ramp", "false"])
    assert [train_script.loss_weights_at(ramped, e).fusion_grad for e in range(4)] == [0.5, 1.0, 1.5, 2.0]
    assert [train_script.loss_weights_at(constant, e).fusion_grad for e in range(4)] == [2.0] * 4


@pytest.mark.parametrize("key, value", [("gradient_padding", "replicate"), ("gradient_target", "weighted")])
def test_loss_choice_flags_reach_the_losses_and_are_checked(patches, key, value):
    _, data = patches
    default = train_script.parse_config(["--data", str(data)])
    assert getattr(train_script.loss_weights_at(default, 0), key) != value  # the default is the other
    config = train_script.parse_config(["--data", str(data), f"--{key}", value])
    train_script.check_config(config)
    assert getattr(train_script.loss_weights_at(config, 3), key) == value
    with pytest.raises(train_script.TrainError, match=f"--{key} must be one of"):
        train_script.check_config(train_script.parse_config(["--data", str(data), f"--{key}", "sideways"]))


def test_recon_size_flags_build_r_and_keep_the_seeded_initialisation(patches, tmp_path, capsys):
    """``--recon_dim/--recon_blocks`` size R; F starts from the same weights whatever R's size,
    the defaults give the initial weights of before the flags existed (F, then R, then P), and a
    bad size is one error line."""
    _, data = patches
    default = train_script.Trainer(train_script.parse_config(["--data", str(data)]), str(tmp_path))
    config = train_script.parse_config(["--data", str(data), "--recon_dim", "24", "--recon_blocks", "3"])
    wider = train_script.Trainer(config, str(tmp_path))
    assert len(wider.recon.blocks) == 3 and wider.recon.project_in.weight.shape == (24, 1, 3, 3)
    assert len(default.recon.blocks) == 2 and default.recon.project_in.weight.shape == (16, 1, 3, 3)
    from ReFusion import LPN, ReFusion, ReN
    torch.manual_seed(0)
    expected = [net().state_dict() for net in (ReFusion, ReN, LPN)]  # the order before the flags
    for trainer in (default, wider):
        assert all(torch.equal(trainer.fusion.state_dict()[k], v) for k, v in expected[0].items())
    for net, reference in zip((default.recon, default.lpn), expected[1:]):
        assert all(torch.equal(net.state_dict()[k], v) for k, v in reference.items())
    assert train_script.main(["--data", str(data), "--recon_dim", "12", "--exp_dir", str(tmp_path)]) == 1
    assert "recon_dim must be a positive multiple of 8" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--batch_size", "0", "--batch_size must be at least 1, got 0"),
    ("--epochs", "0", "--epochs must be at least 1, got 0"),
    ("--accumulation_steps", "0", "--accumulation_steps must be at least 1, got 0"),
    ("--lr_step", "0", "--lr_step must be at least 1, got 0"),
    ("--lr", "-0.5", "--lr must be positive, got -0.5"),
    ("--c_grad", "-1", "--c_grad must be at least 0, got -1.0"),
    ("--crop", "40", "--crop 40 is larger than the 32 px patches of"),
])
def test_unusable_settings_are_one_line_errors_before_any_run_folder(patches, tmp_path, capsys,
                                                                      flag, value, message):
    _, data = patches
    exp_dir = tmp_path / "exp"
    assert train_script.main(["--data", str(data), "--exp_dir", str(exp_dir), flag, value]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err
    assert not exp_dir.exists()


def test_train_errors(tmp_path, capsys):
    assert train_script.main(["--data", str(tmp_path / "none.h5"), "--exp_dir", str(tmp_path)]) == 1
    assert "not found" in capsys.readouterr().err
    (tmp_path / "bad.h5").write_bytes(b"nope")
    assert train_script.main(["--data", str(tmp_path / "bad.h5"), "--exp_dir", str(tmp_path)]) == 1
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"nope")
    assert train_script.main(["--resume", str(tmp_path / "bad.pt")]) == 1
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert train_script.main(["--resume", str(tmp_path / "nope" / "checkpoint.pt")]) == 1
    assert capsys.readouterr().err.strip() == f"error: checkpoint not found: {tmp_path / 'nope' / 'checkpoint.pt'}"
    assert train_script.main(["--preset", "gpu-farm"]) == 1
    assert "unknown preset" in capsys.readouterr().err
    for name, patches, message in (("float.h5", np.zeros((4, 1, 8, 8), np.float32), "expected uint8"),
                                   ("oblong.h5", np.zeros((4, 1, 8, 6), np.uint8), "N x 1 x P x P")):
        with h5py.File(tmp_path / name, "w") as store:
            store["img1"], store["img2"] = patches, patches
        assert train_script.main(["--data", str(tmp_path / name), "--exp_dir", str(tmp_path / "runs")]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def lpn_swap(*args):
    return subprocess.run([sys.executable, "-m", "tools.diagnostics.lpn_swap", *args, "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True)


def test_lpn_swap_retrains_f_under_another_epochs_p(patches, tmp_path, monkeypatch):
    """From a checkpoint in epoch 2's stage 1, epoch 2's whole stage 2 under epoch 2's own P ends
    exactly at ``ReFusion_epoch2.pth``; under epoch 1's P it does not; each F is scored; missing
    weights, an epoch without a next one and an existing output are one-line errors."""
    root, data = patches
    args = TINY + ["--data", str(data), "--crop", "0", "--threads", "1"]
    original = interrupt_at_meta_pair(monkeypatch, 4)
    run_dir, finished, _ = train_script.train(args + ["--exp_dir", str(tmp_path / "run")])
    assert not finished
    snapshot = tmp_path / "snapshot"
    shutil.copytree(run_dir, snapshot)  # checkpoint.pt in epoch 2's stage 1
    monkeypatch.setattr(train_script, "lpn_meta_gradient", original)
    assert train_script.train(["--resume", os.path.join(run_dir, "checkpoint.pt")])[1]
    shutil.copy(os.path.join(run_dir, "LPN_epoch2.pth"), snapshot)
    datasets = tmp_path / "datasets"
    for folder, source in (("ir", "a"), ("vi", "b")):
        (datasets / "IVIF" / "test" / folder).mkdir(parents=True)
        for stem in ("s0", "s1"):
            shutil.copy(root / source / f"{stem}.png", datasets / "IVIF" / "test" / folder)
    out = tmp_path / "out"
    result = lpn_swap("--run", str(snapshot), "--epoch", "1", "--lpn", "2", "1", "--datasets", str(datasets),
                      "--save", str(out))
    assert result.returncode == 0, result.stderr
    assert "4 of epoch 2's 4 stage-2 steps" in result.stdout and "optimisers: the checkpoint's" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "P of epoch" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["(start: F of epoch 1)", "2", "1"]
    assert all(len(row.split("|")) == 13 for row in rows)
    trained = torch.load(os.path.join(run_dir, "ReFusion_epoch2.pth"))
    own, other = (torch.load(out / f"ReFusion_epoch1_lpn{m}.pth") for m in (2, 1))
    assert all(torch.equal(trained[k], own[k]) for k in trained)
    assert not all(torch.equal(trained[k], other[k]) for k in trained)

    fresh = lpn_swap("--run", run_dir, "--epoch", "1", "--lpn", "2", "--steps", "1", "--datasets", str(datasets))
    assert fresh.returncode == 0 and "1 of epoch 2's 4" in fresh.stdout and "fresh Adam" in fresh.stdout
    for bad, message in ((["--epoch", "1", "--lpn", "7"], "LPN_epoch7"), (["--epoch", "2", "--lpn", "1"], "--epoch"),
                         (["--epoch", "1", "--lpn", "1", "--save", str(out)], "exists")):
        refused = lpn_swap("--run", str(snapshot), "--datasets", str(datasets), *bad)
        assert refused.returncode == 1 and refused.stderr.startswith("error:"), refused.stderr
        assert refused.stderr.count("\n") == 1 and message in refused.stderr


def test_release_folder_layout(tmp_path):
    from utils.data import load_pairs
    for i in (1, 2, 10):
        (tmp_path / str(i)).mkdir()
        for j in (1, 2):
            cv2.imwrite(str(tmp_path / str(i) / f"img_{j}.png"), np.full((8, 8, 3), i * 10 + j, np.uint8))
    pairs = load_pairs(str(tmp_path))
    assert pairs.shape == (3, 2, 8, 8) and pairs.dtype == torch.uint8
    assert pairs[2, 1, 0, 0] == 102  # numeric order: 1, 2, 10


def meta_replay(*args):
    return subprocess.run([sys.executable, "-m", "tools.diagnostics.meta_replay", *args, "--every", "1",
                           "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True)


def test_meta_replay_reproduces_each_epochs_p_and_refuses_what_it_cannot_replay(patches, tmp_path):
    """Replaying stage 1 from the previous epoch's weights (epoch 1: the seed's) ends exactly at
    the run's ``LPN_epoch<N>.pth``; an override changes P's path; a cropped run and missing
    weights are one-line errors."""
    _, data = patches
    # one thread on both sides: sums split over threads round differently
    args = TINY + ["--data", str(data), "--crop", "0", "--max_meta_step", "4", "--lpn_lr", "0.25",
                   "--threads", "1"]
    run_dir, finished, _ = train_script.train(args + ["--exp_dir", str(tmp_path / "run")])
    assert finished
    for epoch in ("1", "2"):
        result = meta_replay("--run", run_dir, "--epoch", epoch)
        assert result.returncode == 0, result.stderr
        assert f"LPN_epoch{epoch}.pth: max |difference| 0\n" in result.stdout, result.stdout
        assert len([line for line in result.stdout.splitlines() if line.startswith("| 4 |")]) == 2
    plain = meta_replay("--run", run_dir, "--epoch", "2", "--pairs", "2")
    symmetric = meta_replay("--run", run_dir, "--epoch", "2", "--pairs", "2", "--symmetric_lpn", "true")
    assert "max |difference|" not in plain.stdout + symmetric.stdout  # stopped early / overridden
    last = [line.split("|")[3] for line in plain.stdout.splitlines() if line.startswith("| 2 |")]
    last_symmetric = [line.split("|")[3] for line in symmetric.stdout.splitlines() if line.startswith("| 2 |")]
    assert len(last) == len(last_symmetric) == 2 and last != last_symmetric
    os.remove(os.path.join(run_dir, "ReN_epoch1.pth"))
    missing = meta_replay("--run", run_dir, "--epoch", "2")
    assert missing.returncode == 1 and missing.stderr.startswith("error: missing") and "ReN_epoch1" in missing.stderr
    cropped, _, _ = train_script.train(TINY + ["--data", str(data), "--epochs", "1", "--exp_dir", str(tmp_path / "c")])
    refused = meta_replay("--run", cropped, "--epoch", "1")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1 and "--crop 24" in refused.stderr
