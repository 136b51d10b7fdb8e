"""Train ReFusion: loss learning (P, second order) and fusion learning (F, R), alternating per epoch.

    python train.py                                           # the config block below
    python train.py --data data/IVIF_train.h5 --task IVIF --preset cpu
    python train.py --resume exp/20261124_181500/checkpoint.pt
    torchrun --nproc_per_node 4 train.py ...                  # data-parallel over 4 GPUs (or CPU processes)

Every key of the config block is a flag (``--key value``). Each run writes
``<exp_dir>/<YYYYmmdd_HHMMSS>/``: config.json, log.csv, ReFusion.pth / LPN.pth / ReN.pth
(latest, plus ``*_epoch<N>.pth``) and checkpoint.pt (everything needed to resume bit for bit).
Ctrl-C or SIGTERM finishes the current step, saves checkpoint.pt and exits; so does ``--max_time``
(exit code 0). ``--checkpoint_every`` (default 15 min) also saves it between steps, so that a run
killed without warning loses at most that much.

Under torchrun every process trains a share of each step (``--batch_size`` stays the global batch;
stage 1 spreads the meta pairs of each of P's accumulation groups over the ranks) and rank 0
alone writes the run folder. The result equals one process's up to float rounding.
"""
import json
import os
import sys
from functools import partial

if __name__ == "__main__":  # before torch loads: the allocator's re-exec (utils/runtime.py)
    from utils.runtime import keep_freed_memory
    keep_freed_memory()

import torch
from tqdm import tqdm

from ReFusion import LPN, ReFusion, ReN
from utils.atomic import write_bytes_atomic
from utils.checkpoint import (new_run_dir, read_checkpoint, restore_run, save_run, save_samples,
                              save_weights)
from utils.config import parse_config as config_from_flags
from utils.data import (crop_window, epoch_batches, fusion_steps_per_epoch, load_pairs, make_batch,
                        meta_pair, meta_pairs_per_epoch)
from utils.distributed import (LostRanksError, World, exit_process, join, launched_rank,
                               launched_world_size, lost_contact)
from utils.errors import UserError, run_script
from utils.losses import GRADIENT_TARGETS, PADDINGS
from utils.meta import (META_RULES, LossWeights, LPNUpdate, fusion_step, lpn_meta_gradient,
                        pair_coefficients)
from utils.runtime import STOP_EXIT, RunClock, parse_duration, resolve_device, stop_signals

_BEFORE_CONFIG = set(globals())
# -----------------------------------------------------------------------------
# Edit these, or override any of them with --key value. Defaults: the release's schedule.
data = "data/IVIF_train.h5"   # .h5 from data/img2patch.py, or a folder of <n>/img_1.png, img_2.png
task = "IVIF"                 # recorded in config.json; IVIF | MIF | MFIF | MEIF
epochs = 50                   # epochs, each stage 1 (P) then stage 2 (F and R)
batch_size = 2                # patch pairs per batch (the global batch under torchrun)
lr = 1e-4                     # F and R (Adam), P (normalised gradient step); also the virtual-step size
lpn_lr = 0.0                  # P's step size when > 0 (0: lr, as the release); same StepLR decay
meta_rule = "release"         # P's update: "release" (its code: meta + L_f terms, fresh batch pairs) | "paper"
symmetric_lpn = False         # P's two source orders averaged: no favouring an input by position (not in the release)
lpn_fusion_loss = False       # with --meta_rule paper: P also descends every pair's inner fusion loss
lr_step = 10                  # StepLR for all three (P: see lpn_lr_step): lr * lr_gamma ** (epoch // lr_step)
lpn_lr_step = 0               # P's own StepLR step when > 0 (0: lr_step), e.g. to stop P early, not F
lr_gamma = 0.1                # StepLR's factor
max_meta_step = 600           # stage 1: meta pairs per epoch (at most what the epoch's batches give)
accumulation_steps = 2        # stage 1: outer batches per update of P
max_fusion_steps = 0          # stage 2: batches per epoch (0: one full pass)
crop = 0                      # random crop of each batch to crop x crop (0: whole patches)
c_int = 1.0                   # fusion loss: intensity weight
c_grad = 1.0                  # fusion loss: gradient weight, ramped per epoch as grad_ramp says
grad_ramp = True              # the gradient weight grows as (epoch+1)/epochs (the paper); false: constant (TDFusion)
recon_c_int = 1.0             # reconstruction loss: intensity weight
recon_c_grad = 1.0            # reconstruction loss: gradient weight
gradient_padding = "zero"     # both losses' Sobel maps: "zero" (the release) | "replicate" (no edge at the border)
gradient_target = "max"       # fusion loss's gradient term: "max" (TDFusion's) | "weighted" by P (the paper)
recon_dim = 16                # R's width (a multiple of 8): its capacity
recon_blocks = 2              # R's transformer blocks: its capacity and receptive field
device = "auto"               # auto | cpu | cuda | mps
threads = 0                   # CPU threads (0: PyTorch's default)
seed = 0                      # initial weights, data order and crops
exp_dir = "exp"               # runs go to <exp_dir>/<YYYYmmdd_HHMMSS>/
resume = ""                   # path to a checkpoint.pt to continue
preset = ""                   # "cpu": a short schedule for CPUs (what it sets: PRESETS below, --help)
max_time = ""                 # stop cleanly after this much wall time ("150m", "2h30m", seconds; "": never)
checkpoint_every = "15m"      # also write checkpoint.pt between steps this often ("0": epoch ends only)
dist_timeout = "10m"          # torchrun: a process waiting this long for the others stops with an error
# -----------------------------------------------------------------------------


# the config keys: every name the block above defines
CONFIG_KEYS = [k for k in globals() if k not in _BEFORE_CONFIG and not k.startswith("_")]
# "cpu": a usable model in 25-60 min with 2 threads on 2 cores of an AMD EPYC; "smoke": a minute's check
PRESETS = {"cpu": {"epochs": 6, "crop": 64, "max_meta_step": 100, "max_fusion_steps": 1500,
                   "lr": 2e-4, "lr_step": 4, "batch_size": 2},
           "smoke": {"epochs": 1, "crop": 32, "max_meta_step": 4, "max_fusion_steps": 20, "exp_dir": "exp/smoke"}}
# keys whose absence from a run's config.json means a rule older than today's default
BEFORE_KEY = {"meta_rule": "paper", "gradient_target": "weighted"}
# how to run, not what to train: a resumed run takes these from its command line
HOW_TO_RUN = ("device", "threads", "max_time", "checkpoint_every", "dist_timeout")
# the least value of each numeric key the schedule can run with
LEAST = {"epochs": 1, "batch_size": 1, "lr_step": 1, "accumulation_steps": 1, "max_meta_step": 0,
         "max_fusion_steps": 0, "crop": 0, "threads": 0, "lpn_lr": 0, "lpn_lr_step": 0, "c_int": 0,
         "c_grad": 0, "recon_c_int": 0, "recon_c_grad": 0, "recon_blocks": 0}


class TrainError(UserError):
    pass


# -- config ----------------------------------------------------------------------------------
def default_config():
    return {k: globals()[k] for k in CONFIG_KEYS}


def saved_config(saved):
    """A run's config as written by any version: keys added since take their defaults, except
    those that changed what a run does (``BEFORE_KEY``), which keep the run's original rule."""
    return {**default_config(), **BEFORE_KEY, **saved}


def parse_config(argv):
    return config_from_flags(default_config(), PRESETS, argv, __doc__, __file__)


def check_config(config, world_size=1):
    """One ``TrainError`` line for a value the schedule cannot run with (before a run folder exists)."""
    for key, least in LEAST.items():
        if not config[key] >= least:
            raise TrainError(f"--{key} must be at least {least}, got {config[key]}")
    for key in ("lr", "lr_gamma"):
        if not config[key] > 0:
            raise TrainError(f"--{key} must be positive, got {config[key]}")
    for key in ("max_time", "checkpoint_every", "dist_timeout"):
        try:
            duration = parse_duration(config[key])
        except UserError as error:
            raise TrainError(f"--{key}: {error}") from None
        if key == "dist_timeout" and not duration > 0:
            raise TrainError("--dist_timeout must be a positive duration")
    if config["batch_size"] % world_size:
        raise TrainError(f"--batch_size {config['batch_size']} (the global batch) cannot be split evenly "
                         f"over {world_size} processes: use a multiple of {world_size}")
    for key, choices in (("meta_rule", META_RULES), ("gradient_padding", PADDINGS),
                         ("gradient_target", GRADIENT_TARGETS)):
        if config[key] not in choices:
            raise TrainError(f"--{key} must be one of {', '.join(choices)}, got '{config[key]}'")
    if config["lpn_fusion_loss"] and config["meta_rule"] != "paper":
        raise TrainError("--lpn_fusion_loss true belongs to --meta_rule paper (the release's rule "
                         "already adds the fusion loss its own way)")
    if config["recon_dim"] < 8 or config["recon_dim"] % 8:
        raise TrainError(f"--recon_dim must be a positive multiple of 8 (R has 8 attention heads), "
                         f"got {config['recon_dim']}")


# -- the schedule ----------------------------------------------------------------------------
def lr_at(config, epoch, key="lr"):
    """``key``'s rate in (0-based) ``epoch``; "lpn_lr" falls back to lr, lpn_lr_step to lr_step."""
    step = (key == "lpn_lr" and config["lpn_lr_step"]) or config["lr_step"]
    return (config[key] or config["lr"]) * config["lr_gamma"] ** (epoch // step)


def loss_weights_at(config, epoch):
    """Both losses' coefficients in (0-based) ``epoch``: the gradient term ramps as (epoch+1)/epochs
    unless ``grad_ramp`` is off."""
    c = config
    ramp = (epoch + 1) / c["epochs"] if c["grad_ramp"] else 1.0
    return LossWeights(c["c_int"], c["c_grad"] * ramp, c["recon_c_int"],
                       c["recon_c_grad"], c["symmetric_lpn"], c["meta_rule"], c["lpn_fusion_loss"],
                       c["gradient_padding"], c["gradient_target"])


def empty_sums():
    """Running loss totals of the current epoch (kept in checkpoint.pt)."""
    return {"meta": 0.0, "fusion": 0.0, "recon": 0.0, "meta_n": 0, "fusion_n": 0, "seconds": 0.0}


def rank_seed(seed, rank):
    """The seed of rank ``rank``'s own generator (torch's global one) in a run of several processes."""
    return seed * 1_000_003 + 7_919 * (rank + 1)


class Trainer:
    """Networks, optimisers, data and the position in the schedule (epoch, stage, step, the
    epoch's loss sums), and one round of each stage. ``world`` (``utils.distributed.World``;
    default: one process) says which share of each step this process computes."""

    def __init__(self, config, run_dir=None, world=None):
        self.config, self.run_dir = config, run_dir
        self.world = world or World(device=resolve_device(config["device"]))
        self.device = self.world.device
        if config["threads"] > 0:
            torch.set_num_threads(config["threads"])
        self.pairs = load_pairs(config["data"])
        if len(self.pairs) < 2 * config["batch_size"]:
            raise TrainError(f"{config['data']} holds {len(self.pairs)} pairs; need at least "
                             f"{2 * config['batch_size']} for batch size {config['batch_size']}")
        if config["crop"] > self.pairs.shape[-1]:
            raise TrainError(f"--crop {config['crop']} is larger than the {self.pairs.shape[-1]} px "
                             f"patches of {config['data']}")
        torch.manual_seed(config["seed"])
        # built in this order so that a seed gives the same initial weights as before R was configurable
        self.fusion = ReFusion().to(self.device)
        self.recon = ReN(dim=config["recon_dim"], num_blocks=config["recon_blocks"]).to(self.device)
        self.lpn = LPN().to(self.device)
        if self.world.size > 1:
            torch.manual_seed(rank_seed(config["seed"], self.world.rank))
        # what stage 2 calls: in a world of several, wrappers that average F's and R's gradients
        self.train_fusion, self.train_recon = self.world.wrap(self.fusion), self.world.wrap(self.recon)
        self.opt_fusion = torch.optim.Adam(self.fusion.parameters(), lr=config["lr"])
        self.opt_recon = torch.optim.Adam(self.recon.parameters(), lr=config["lr"])
        self.crop_rng = torch.Generator().manual_seed(config["seed"])
        self.lpn_update = LPNUpdate(self.lpn, config["accumulation_steps"])
        self.epoch, self.stage, self.step, self.sums = 0, "meta", 0, empty_sums()

    def set_rate(self, rate):
        """F's and R's optimisers step at ``rate`` from now on."""
        for optimiser in (self.opt_fusion, self.opt_recon):
            for group in optimiser.param_groups:
                group["lr"] = rate

    def meta_round(self, batches, meta_steps, rate, lpn_rate, weights):
        """Stage 1, pairs ``step, step+1, ...``: one per rank, all in the same accumulation group of
        P, so that they all see the same P. Each pair's gradient for P (``lpn_meta_gradient``,
        weighed by ``pair_coefficients``) is summed over the ranks and added to P's update exactly
        as one process would add them one by one. Every rank draws every crop window, so that the
        ranks' generators stay equal."""
        first, group = self.step, self.config["accumulation_steps"]
        end = min(first + self.world.size, (first // group + 1) * group, meta_steps)
        size, crop = self.pairs.shape[-1], self.config["crop"]
        windows = [(crop_window(size, crop, self.crop_rng), crop_window(size, crop, self.crop_rng))
                   for _ in range(first, end)]
        mine = first + self.world.rank
        if mine < end:
            (inner, outer), (inner_window, outer_window) = meta_pair(weights.meta_rule, mine), windows[mine - first]
            loss, grads = lpn_meta_gradient(
                self.fusion, self.recon, self.lpn, make_batch(self.pairs, batches[inner], inner_window, self.device),
                make_batch(self.pairs, batches[outer], outer_window, self.device), rate, weights,
                pair_coefficients(weights, mine, group))
        else:  # more ranks than pairs left in the group
            loss, grads = torch.zeros((), device=self.device), [torch.zeros_like(p) for p in self.lpn.parameters()]
        *grads, loss = self.world.sum([*grads, loss])
        self.lpn_update.add(grads, end - 1, meta_steps, lpn_rate)
        self.sums["meta"] += loss.item()
        self.sums["meta_n"] += end - first
        self.step = end

    def fusion_round(self, batches, weights):
        """Stage 2, step ``step``: each rank steps F and R on its share of the batch; the wrappers
        average their gradients over the ranks, so every rank takes the same optimiser step."""
        window = crop_window(self.pairs.shape[-1], self.config["crop"], self.crop_rng)
        batch = self.world.share(make_batch(self.pairs, batches[self.step], window, self.device))
        losses = fusion_step(self.train_fusion, self.train_recon, self.lpn, batch, weights,
                             self.opt_fusion, self.opt_recon)
        loss_f, loss_r = self.world.mean_of(losses)
        self.sums["fusion"] += loss_f
        self.sums["recon"] += loss_r
        self.sums["fusion_n"] += 1
        self.step += 1


# -- the run folder --------------------------------------------------------------------------
def epoch_seconds(trainer, clock):
    """Wall time spent in the current epoch, over every stretch of it (resumes included)."""
    return trainer.sums.get("seconds", 0.0) + clock.stretch_seconds()


def log_rows(log, finished, row=None):
    """log.csv with the rows of the first ``finished`` epochs (a row written before a failed
    checkpoint, whose epoch a resume trains again, goes), then ``row``; rewritten atomically."""
    lines = open(log).read().splitlines() if os.path.exists(log) else []
    lines = (lines or ["epoch,meta_outer_loss,fusion_loss,recon_loss,lr,seconds"])[:finished + 1]
    write_bytes_atomic(log, "".join(f"{line}\n" for line in lines + ([row] if row else [])).encode())


def finish_epoch(trainer, clock, rate):
    """The epoch's weights, samples and log.csv row, then the position moves to the next epoch."""
    s, run_dir, number = trainer.sums, trainer.run_dir, trainer.epoch + 1
    row = [number, s["meta"] / max(s["meta_n"], 1), s["fusion"] / max(s["fusion_n"], 1),
           s["recon"] / max(s["fusion_n"], 1), rate, round(epoch_seconds(trainer, clock), 1)]
    if trainer.world.main:
        for name, net in (("ReFusion", trainer.fusion), ("LPN", trainer.lpn), ("ReN", trainer.recon)):
            save_weights(net, os.path.join(run_dir, f"{name}_epoch{number}.pth"), os.path.join(run_dir, f"{name}.pth"))
        save_samples(trainer.fusion, trainer.pairs, trainer.device, os.path.join(run_dir, f"samples_epoch{number}.png"))
        log_rows(os.path.join(run_dir, "log.csv"), number - 1,
                 ",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row))
    trainer.epoch, trainer.stage, trainer.step, trainer.sums = number, "meta", 0, empty_sums()
    clock.new_epoch()
    save_run(trainer, epoch_seconds(trainer, clock))


# -- training --------------------------------------------------------------------------------
def stop_here(trainer, clock):
    """At a step boundary: True when the run should stop; writes the periodic checkpoint when due."""
    stop, due = clock.at_step_boundary(trainer.world)
    if due and not stop:
        save_run(trainer, epoch_seconds(trainer, clock))
        clock.checkpoint_written()
    return stop


def run_epochs(trainer, clock):
    """The schedule from the trainer's position on; False when a stop was asked for."""
    c, world = trainer.config, trainer.world
    # rank 0 reports; into a log file (no terminal) a line a minute, not one per step
    bar_of = partial(tqdm, disable=not world.main, mininterval=0.1 if sys.stderr.isatty() else 60)
    while trainer.epoch < c["epochs"]:
        rate, lpn_rate = lr_at(c, trainer.epoch), lr_at(c, trainer.epoch, "lpn_lr")
        trainer.set_rate(rate)
        batches = epoch_batches(len(trainer.pairs), c["batch_size"], c["seed"], trainer.epoch)
        weights = loss_weights_at(c, trainer.epoch)
        meta_steps = meta_pairs_per_epoch(c["meta_rule"], len(batches), c["max_meta_step"])
        fusion_steps = fusion_steps_per_epoch(len(trainer.pairs), c["batch_size"], c["max_fusion_steps"])

        # stage 1, loss learning: pairs -> P's exact gradient through a virtual step of F -> P's update
        if trainer.stage == "meta":
            bar = bar_of(desc=f"epoch {trainer.epoch + 1} loss learning", unit="pair",
                         initial=trainer.step, total=meta_steps)
            while trainer.step < meta_steps:
                if stop_here(trainer, clock):
                    return False
                done = trainer.step
                trainer.meta_round(batches, meta_steps, rate, lpn_rate, weights)
                bar.set_postfix(outer=f"{trainer.sums['meta'] / trainer.sums['meta_n']:.4f}", refresh=False)
                bar.update(trainer.step - done)
            bar.close()
            trainer.stage, trainer.step = "fusion", 0

        # stage 2, fusion learning: Adam steps of F on P's loss and of R on reconstruction
        bar = bar_of(range(trainer.step, fusion_steps), desc=f"epoch {trainer.epoch + 1} fusion learning",
                     unit="batch", initial=trainer.step, total=fusion_steps)
        for _ in bar:
            if stop_here(trainer, clock):
                return False
            trainer.fusion_round(batches, weights)
            n = trainer.sums["fusion_n"]
            bar.set_postfix(fusion=f"{trainer.sums['fusion'] / n:.4f}", recon=f"{trainer.sums['recon'] / n:.4f}",
                            refresh=False)
        finish_epoch(trainer, clock, rate)
    return True


def train(argv):
    """Run training; returns (run_dir, finished, stop_reason)."""
    config = parse_config(argv)
    state = None
    if config["resume"]:
        state = read_checkpoint(config["resume"], what="checkpoint")
        if not isinstance(state, dict) or "fusion" not in state or "config" not in state:
            raise TrainError(f"{config['resume']} is not a train.py checkpoint.pt")
        overrides = {k: config[k] for k in HOW_TO_RUN}
        config = {**saved_config(state["config"]), **overrides, "resume": config["resume"]}
    check_config(config, launched_world_size())
    resume_dir = os.path.dirname(os.path.abspath(config["resume"])) if state is not None else None
    try:
        world = join(resolve_device(config["device"]), parse_duration(config["dist_timeout"]))
        result = train_in(world, config, state, resume_dir)
    except RuntimeError as error:
        if not lost_contact(error):
            raise
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise LostRanksError(f"lost contact with the other training processes ({reason}); "
                             f"the run folder's checkpoint.pt is intact") from None
    world.leave()
    return result


def train_in(world, config, state, resume_dir):
    trainer = Trainer(config, world=world)
    say = print if world.main else lambda *args, **kwargs: None
    run_dir = trainer.run_dir = world.from_main(
        resume_dir or (new_run_dir(config["exp_dir"]) if world.main else None))
    if state is not None:
        restore_run(trainer, state, world.rank, world.size, rank_seed(config["seed"], world.rank) + state["epoch"])
        say(f"resuming {run_dir} at epoch {trainer.epoch + 1}, {trainer.stage} step {trainer.step}")
    else:
        if world.main:
            with open(os.path.join(run_dir, "config.json"), "w") as stream:
                json.dump(config, stream, indent=2)
        say(f"run folder: {run_dir}" + (f" ({world.size} processes)" if world.size > 1 else ""))
    clock = RunClock(config["max_time"], config["checkpoint_every"])
    with stop_signals(clock, world.size == 1, say):
        clock.start()
        finished = run_epochs(trainer, clock)
        if not finished:
            save_run(trainer, epoch_seconds(trainer, clock))
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    if not finished:
        why = f"--max_time {config['max_time']} reached; " if clock.stop_reason == "max_time" else ""
        launcher = "torchrun ... train.py" if world.size > 1 else "python train.py"
        say(f"{why}saved {checkpoint}; continue with {launcher} --resume {checkpoint}"
            + (" (any number of processes)" if world.size > 1 else ""), file=sys.stderr)
    else:
        say(f"done: {os.path.join(run_dir, 'ReFusion.pth')}")
    return run_dir, finished, clock.stop_reason


def main(argv=None):
    def action():
        _, finished, reason = train(sys.argv[1:] if argv is None else argv)
        return 0 if finished else STOP_EXIT[reason]
    return run_script(action, "aborted; the last checkpoint.pt is intact",
                      rank=launched_rank() if launched_world_size() > 1 else None)


if __name__ == "__main__":
    code = main()
    if launched_world_size() > 1:
        exit_process(code)
    sys.exit(code)
