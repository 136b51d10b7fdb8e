"""train.py under torchrun on CPU (gloo, two processes): the same weights as one process, stop and
resume with another number of processes, one writer, refusals and a dead or missing rank."""
import csv
import glob
import os
import signal
import socket
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from conftest import ROOT
from test_train import load_script, start_run, wait_for_checkpoint, weights

TRAIN = os.path.join(ROOT, "train.py")

train_script = load_script("refusion_train_distributed", "train.py")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not os.path.isdir("/proc"),
                                reason="needs torch.distributed and Linux's /proc (to find a rank's pid)")

NETS = ["--recon_dim", "8", "--recon_blocks", "1", "--device", "cpu", "--threads", "1",
        "--lr", "1e-3", "--lr_step", "1", "--crop", "24"]
# two epochs; 3 meta pairs in groups of 2 end the epoch with a group cut short
SHORT = NETS + ["--epochs", "2", "--batch_size", "2", "--max_meta_step", "3",
                "--accumulation_steps", "2", "--max_fusion_steps", "3"]
# groups of 3 over 2 ranks (one idles every other round), a global batch of 4
ODD_GROUPS = NETS + ["--epochs", "2", "--batch_size", "4", "--max_meta_step", "4",
                     "--accumulation_steps", "3", "--max_fusion_steps", "2"]
# long enough (about 50 steps) to be stopped mid-run
# the longer runs take the smooth, P-weighted gradient term: over their 24 Adam steps the default
# (max) term's L1 kinks turn the float rounding of a batch split over two ranks into up to 1.4e-5
# of one F weight (4.5e-7 of the norm), above the tolerance; SHORT and ODD_GROUPS run the default
LONG = NETS + ["--epochs", "4", "--batch_size", "2", "--max_meta_step", "6",
               "--accumulation_steps", "2", "--max_fusion_steps", "6", "--gradient_target", "weighted"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("distributed") / "train.h5"
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:32, 0:32]
    with h5py.File(path, "w") as store:
        periods = 3 + np.arange(16)[:, None, None, None]
        scene = 127 + 100 * np.sin(xx / 4) * np.cos(yy / periods)  # (16,1,32,32)
        store["img1"] = np.clip(scene + rng.normal(0, 8, scene.shape), 0, 255).astype(np.uint8)
        store["img2"] = np.clip(255 - scene + rng.normal(0, 8, scene.shape), 0, 255).astype(np.uint8)
    return str(path)


def torchrun_command(args, ranks=2, script=TRAIN):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(ranks), str(script)] + args


def torchrun(args, ranks=2, script=TRAIN):
    """(exit code, everything the processes printed)"""
    done = subprocess.run(torchrun_command(args, ranks, script), cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return done.returncode, done.stdout + done.stderr


def start_torchrun(args):
    """torchrun and its workers in a process group of their own, as a terminal would start them."""
    return subprocess.Popen(torchrun_command(args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)


def run_dir(exp_dir):
    (found,) = glob.glob(os.path.join(exp_dir, "*", "config.json"))
    return os.path.dirname(found)


def assert_close(expected, actual, tolerance=1e-5):
    """Every network's weights equal to ``tolerance`` relative (norm of the difference over the
    norm of the weights, and largest difference over the largest weight)."""
    for name in expected:
        a = torch.cat([v.flatten() for v in expected[name].values()])
        b = torch.cat([actual[name][k].flatten() for k in expected[name]])
        assert (a - b).norm() <= tolerance * a.norm(), name
        assert (a - b).abs().max() <= tolerance * a.abs().max(), name
        assert not torch.equal(a, torch.cat([v.flatten() for v in initial_weights(name)])), name


def initial_weights(name):
    """Untrained weights of the same configuration: a run must have moved away from them."""
    from ReFusion import LPN, ReFusion, ReN
    torch.manual_seed(0)
    nets = {"ReFusion": ReFusion(), "ReN": ReN(dim=8, num_blocks=1), "LPN": LPN()}
    return nets[name].state_dict().values()


def losses(directory):
    with open(os.path.join(directory, "log.csv")) as stream:
        return [[float(row[k]) for k in ("meta_outer_loss", "fusion_loss", "recon_loss")]
                for row in csv.DictReader(stream)]


@pytest.mark.parametrize("schedule", [SHORT, ODD_GROUPS], ids=["groups_of_2", "groups_of_3_batch_4"])
def test_two_ranks_equal_one_process(data, tmp_path, schedule):
    one, finished, _ = train_script.train(schedule + ["--data", data, "--exp_dir", str(tmp_path / "one")])
    assert finished
    code, err = torchrun(schedule + ["--data", data, "--exp_dir", str(tmp_path / "two")])
    assert code == 0, err
    two = run_dir(tmp_path / "two")
    assert_close(weights(one), weights(two))
    np.testing.assert_allclose(losses(two), losses(one), rtol=1e-5)
    # rank 0 alone wrote: the same files as one process, no second run folder
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))
    assert len(os.listdir(tmp_path / "two")) == 1
    assert err.count("run folder:") == 1


@pytest.fixture(scope="module")
def long_reference(data, tmp_path_factory):
    exp_dir = tmp_path_factory.mktemp("long_reference")
    directory, finished, _ = train_script.train(LONG + ["--data", data, "--exp_dir", str(exp_dir)])
    assert finished
    return weights(directory)


@pytest.mark.parametrize("how", ["sigterm_to_torchrun", "ctrl_c"])
def test_a_stop_under_torchrun_then_resume_in_one_process(data, tmp_path, long_reference, how):
    """SIGTERM to torchrun (which passes it on), or Ctrl-C (SIGINT to every process of the group,
    then torchrun's own SIGINT to the ranks again): both ranks stop at the same step with one
    checkpoint, which one process resumes to the uninterrupted result."""
    exp_dir = tmp_path / "run"
    process = start_torchrun(LONG + ["--data", data, "--exp_dir", str(exp_dir), "--checkpoint_every", "0.2s"])
    directory = wait_for_checkpoint(process, exp_dir)
    if how == "ctrl_c":
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert "saved" in err and "continue with" in err, err
    state = torch.load(os.path.join(directory, "checkpoint.pt"), weights_only=True)
    assert state["epoch"] < 4 and len(state["rank_rngs"]) == 2
    assert not [n for n in os.listdir(directory) if n.endswith(".partial")]
    _, finished, _ = train_script.train(["--resume", os.path.join(directory, "checkpoint.pt"), "--threads", "1"])
    assert finished
    assert_close(long_reference, weights(directory))


def test_one_process_stopped_then_resumed_by_two(data, tmp_path, long_reference):
    exp_dir = tmp_path / "run"
    process = start_run(LONG + ["--data", data, "--exp_dir", str(exp_dir), "--checkpoint_every", "0.2s"])
    directory = wait_for_checkpoint(process, exp_dir)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    code, err = torchrun(["--resume", os.path.join(directory, "checkpoint.pt"), "--threads", "1"])
    assert code == 0, err
    assert_close(long_reference, weights(directory))


def rank_pid(launcher, rank, timeout=60):
    """The pid of the worker with ``RANK=rank`` among the launcher's children."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in glob.glob(f"/proc/{launcher}/task/*/children"):
            for pid in open(path).read().split():
                try:
                    environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in environ:
                    return int(pid)
        time.sleep(0.05)
    raise AssertionError(f"no rank {rank} under {launcher}")


def test_a_dead_rank_stops_the_others_with_an_error(data, tmp_path, long_reference):
    exp_dir = tmp_path / "run"
    process = start_torchrun(LONG + ["--data", data, "--exp_dir", str(exp_dir), "--checkpoint_every", "0.2s"])
    directory = wait_for_checkpoint(process, exp_dir)
    os.kill(rank_pid(process.pid, 1), signal.SIGKILL)
    started = time.monotonic()
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0
    assert time.monotonic() - started < 60
    assert "error: (rank 0) lost contact with the other training processes" in err, err
    assert not [n for n in os.listdir(directory) if n.endswith(".partial")]
    # the last checkpoint survives and resumes to the uninterrupted result
    code, err = torchrun(["--resume", os.path.join(directory, "checkpoint.pt"), "--threads", "1"])
    assert code == 0, err
    assert_close(long_reference, weights(directory))


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_rank_whose_peers_never_come_times_out(data, tmp_path):
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    started = time.monotonic()
    done = subprocess.run([sys.executable, TRAIN, *SHORT, "--data", data,
                           "--exp_dir", str(tmp_path / "run"), "--dist_timeout", "3s"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert time.monotonic() - started < 60
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: (rank 0) lost contact"), done.stderr
    assert not os.path.exists(tmp_path / "run")


def test_bad_input_is_reported_even_when_rank_0_meets_it_last(tmp_path):
    # the launcher ends every rank once one fails: a rank that failed quietly before rank 0 had
    # printed the error would leave the user without it
    script = tmp_path / "late_rank_0.py"
    script.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from utils.errors import UserError, run_script\n"
        "rank = int(os.environ['RANK'])\n"
        "def action():\n"
        "    time.sleep(3 if rank == 0 else 0)\n"
        "    raise UserError('the same bad input on every rank')\n"
        "sys.exit(run_script(action, rank=rank))\n")
    code, err = torchrun([], script=script)
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: the same bad input on every rank"], err


def test_a_batch_that_does_not_split_is_refused(data, tmp_path):
    code, err = torchrun(SHORT + ["--data", data, "--exp_dir", str(tmp_path / "run"), "--batch_size", "3"])
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: --batch_size 3 (the global batch) cannot be split evenly over 2 processes: "
                      "use a multiple of 2"], err
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("value", ["0", "soon"])
def test_dist_timeout_must_be_a_positive_duration(data, value, capsys):
    assert train_script.main(SHORT + ["--data", data, "--dist_timeout", value]) == 1
    assert "--dist_timeout" in capsys.readouterr().err


def test_a_rank_ends_with_its_exit_code_and_output_but_no_interpreter_shutdown():
    """What ends a process of a multi-process run: its output is out and its exit code given,
    while what would run at interpreter shutdown (here an atexit handler; in a rank, a gloo thread
    freeing tensors under the GIL) never runs."""
    script = ("import atexit, sys\n"
              "from utils.distributed import exit_process\n"
              "atexit.register(lambda: print('shutdown ran'))\n"
              "print('to stdout', end='')\n"
              "print('to stderr', end='', file=sys.stderr)\n"
              "exit_process(3)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (3, "to stdout", "to stderr")
