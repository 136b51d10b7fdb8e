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
import argparse
import json
import os
import signal
import sys
import time

# -----------------------------------------------------------------------------
# Edit these, or override any of them with --key value. Defaults: the release's schedule.
data = "data/IVIF_train.h5"   # .h5 from data/img2patch.py, or a folder of <n>/img_1.png, img_2.png
task = "IVIF"                 # recorded in config.json; IVIF | MIF | MFIF | MEIF
epochs = 50
batch_size = 2
lr = 1e-4                     # F and R (Adam), P (normalised gradient step); also the virtual-step size
lpn_lr = 0.0                  # P's step size when > 0 (0: lr, as the release); same StepLR decay
meta_rule = "release"         # P's update: "release" (its code: meta + L_f terms, fresh batch pairs) | "paper"
symmetric_lpn = False         # P's two source orders averaged: no favouring an input by position (not in the release)
lpn_fusion_loss = False       # with --meta_rule paper: P also descends every pair's inner fusion loss
lr_step = 10                  # StepLR for all three (P: see lpn_lr_step): lr * lr_gamma ** (epoch // lr_step)
lpn_lr_step = 0               # P's own StepLR step when > 0 (0: lr_step), e.g. to stop P early, not F
lr_gamma = 0.1
max_meta_step = 600           # stage 1: meta pairs per epoch (at most what the epoch's batches give)
accumulation_steps = 2        # stage 1: outer batches per update of P
max_fusion_steps = 0          # stage 2: batches per epoch (0: one full pass)
crop = 0                      # random crop of each batch to crop x crop (0: whole patches)
c_int = 1.0                   # fusion loss: intensity weight
c_grad = 1.0                  # fusion loss: gradient weight, scaled by (epoch+1)/epochs
recon_c_int = 1.0             # reconstruction loss weights
recon_c_grad = 1.0
recon_dim = 16                # R's width (ReN's dim, a multiple of 8) ...
recon_blocks = 2              # ... and transformer blocks: its capacity and receptive field
device = "auto"               # auto | cpu | cuda | mps
threads = 0                   # CPU threads (0: PyTorch's default)
seed = 0
exp_dir = "exp"
resume = ""                   # path to a checkpoint.pt to continue
preset = ""                   # "cpu": a short schedule for CPUs (PRESETS below)
max_time = ""                 # stop cleanly after this much wall time ("150m", "2h30m", seconds; "": never)
checkpoint_every = "15m"      # also write checkpoint.pt between steps this often ("0": epoch ends only)
dist_timeout = "10m"          # torchrun: a process waiting this long for the others stops with an error
# -----------------------------------------------------------------------------

# the config keys: every plain value defined above (modules and dunders are not)
CONFIG_KEYS = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (bool, int, float, str))]
# "cpu": a usable model in 25-60 min with 2 threads on 2 cores of an AMD EPYC; see README
PRESETS = {"cpu": {"epochs": 6, "crop": 64, "max_meta_step": 100, "max_fusion_steps": 1500,
                   "lr": 2e-4, "lr_step": 4, "batch_size": 2}}


from utils.errors import UserError, run_script  # noqa: E402


class TrainError(UserError):
    pass


def default_config():
    return {k: globals()[k] for k in CONFIG_KEYS}


def parse_bool(text):
    """``--key true|false|1|0|yes|no`` for the boolean keys of the config block."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")
    return value


def parse_config(argv):
    defaults = default_config()
    parser = argparse.ArgumentParser(description="Train ReFusion.")
    for key, value in defaults.items():
        parser.add_argument(f"--{key}", type=parse_bool if isinstance(value, bool) else type(value),
                            default=None)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    config = dict(defaults)
    preset_name = given.get("preset", config["preset"])
    if preset_name:
        if preset_name not in PRESETS:
            raise TrainError(f"unknown preset '{preset_name}': choose from {', '.join(PRESETS)}")
        config.update(PRESETS[preset_name])
    config.update(given)
    return config


# the least value of each numeric key the schedule can run with
LEAST = {"epochs": 1, "batch_size": 1, "lr_step": 1, "accumulation_steps": 1, "max_meta_step": 0,
         "max_fusion_steps": 0, "crop": 0, "threads": 0, "lpn_lr": 0, "lpn_lr_step": 0, "c_int": 0,
         "c_grad": 0, "recon_c_int": 0, "recon_c_grad": 0, "recon_blocks": 0}


def check_config(config, world_size=1):
    """One ``TrainError`` line for a value the schedule cannot run with (before a run folder exists)."""
    for key, least in LEAST.items():
        if not config[key] >= least:
            raise TrainError(f"--{key} must be at least {least}, got {config[key]}")
    for key in ("lr", "lr_gamma"):
        if not config[key] > 0:
            raise TrainError(f"--{key} must be positive, got {config[key]}")
    from utils.runtime import parse_duration
    durations = {}
    for key in ("max_time", "checkpoint_every", "dist_timeout"):
        try:
            durations[key] = parse_duration(config[key])
        except UserError as error:
            raise TrainError(f"--{key}: {error}") from None
    if not durations["dist_timeout"] > 0:
        raise TrainError("--dist_timeout must be a positive duration")
    if config["batch_size"] % world_size:
        raise TrainError(f"--batch_size {config['batch_size']} (the global batch) cannot be split evenly "
                         f"over {world_size} processes: use a multiple of {world_size}")
    from utils.meta import META_RULES
    if config["meta_rule"] not in META_RULES:
        raise TrainError(f"--meta_rule must be one of {', '.join(META_RULES)}, got '{config['meta_rule']}'")
    if config["lpn_fusion_loss"] and config["meta_rule"] != "paper":
        raise TrainError("--lpn_fusion_loss true belongs to --meta_rule paper (the release's rule "
                         "already adds the fusion loss its own way)")
    if config["recon_dim"] < 8 or config["recon_dim"] % 8:
        raise TrainError(f"--recon_dim must be a positive multiple of 8 (R has 8 attention heads), "
                         f"got {config['recon_dim']}")


# keys whose absence from a run's config.json means a rule older than today's default
BEFORE_KEY = {"meta_rule": "paper"}


def saved_config(saved):
    """A run's config as written by any version: keys added since take their defaults, except
    those that changed what a run does (``BEFORE_KEY``), which keep the run's original rule."""
    return {**default_config(), **BEFORE_KEY, **saved}


def empty_sums():
    """Running loss totals of the current epoch (kept in checkpoint.pt)."""
    return {"meta": 0.0, "fusion": 0.0, "recon": 0.0, "meta_n": 0, "fusion_n": 0, "seconds": 0.0}


def lr_at(config, epoch, key="lr"):
    """``key``'s rate in (0-based) ``epoch``; "lpn_lr" falls back to lr, lpn_lr_step to lr_step."""
    step = (key == "lpn_lr" and config["lpn_lr_step"]) or config["lr_step"]
    return (config[key] or config["lr"]) * config["lr_gamma"] ** (epoch // step)


def loss_weights_at(config, epoch):
    """Both losses' coefficients in (0-based) ``epoch``: the gradient term ramps as (epoch+1)/epochs."""
    from utils.meta import LossWeights
    c = config
    return LossWeights(c["c_int"], c["c_grad"] * (epoch + 1) / c["epochs"], c["recon_c_int"],
                       c["recon_c_grad"], c["symmetric_lpn"], c["meta_rule"], c["lpn_fusion_loss"])


# how a stop was asked for, in rising priority: the ranks of a run stop for the highest any saw
STOP_REASONS = (None, "max_time", "SIGTERM", "SIGINT")


def rank_seed(seed, rank):
    """The seed of rank ``rank``'s own generator (torch's global one) in a run of several processes."""
    return seed * 1_000_003 + 7_919 * (rank + 1)


class Trainer:
    """Networks, optimisers, data and the position in the schedule; saves and restores all of it
    in ``run_dir`` (``train()`` sets it once the data has loaded, so bad data leaves no empty run
    folder). ``world`` (``utils.distributed.World``; default: one process) says which share of
    each step this process computes."""

    def __init__(self, config, run_dir=None, world=None):
        import torch

        from ReFusion import LPN, ReFusion, ReN
        from utils.data import load_pairs
        from utils.distributed import World
        from utils.meta import LPNUpdate
        from utils.runtime import resolve_device

        self.config, self.run_dir = config, run_dir
        self.world = world or World(device=resolve_device(config["device"]))
        self.device = self.world.device
        if config["threads"] > 0:
            torch.set_num_threads(config["threads"])
        self.pairs = load_pairs(config["data"])
        if len(self.pairs) < 2 * config["batch_size"]:
            raise TrainError(f"{config['data']} holds {len(self.pairs)} pairs; need at least "
                             f"{2 * config['batch_size']} for batch size {config['batch_size']}")
        torch.manual_seed(config["seed"])
        if config["crop"] > self.pairs.shape[-1]:
            raise TrainError(f"--crop {config['crop']} is larger than the {self.pairs.shape[-1]} px "
                             f"patches of {config['data']}")
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
        self.epoch, self.stage, self.step = 0, "meta", 0
        self.lpn_update = LPNUpdate(self.lpn, config["accumulation_steps"])
        self.sums = empty_sums()
        self.stop_reason = None  # "SIGINT", "SIGTERM" or "max_time": stop at the next step boundary
        self.stretch_started = time.time()  # start of this stretch of the current epoch
        self.deadline = self.next_checkpoint = None
        self.checkpoint_interval = 0  # seconds; set with the deadline by start_clock()

    def start_clock(self):
        """``--max_time`` and ``--checkpoint_every`` count from here."""
        from utils.runtime import parse_duration
        now, self.stretch_started = time.monotonic(), time.time()
        limit = parse_duration(self.config["max_time"])
        self.deadline = now + limit if limit else None
        self.checkpoint_interval = parse_duration(self.config["checkpoint_every"])
        self.next_checkpoint = now + self.checkpoint_interval

    def at_step_boundary(self):
        """True when the run should stop here; writes the periodic checkpoint when it is due.
        All ranks decide together, so that they stop at the same step."""
        now = time.monotonic()
        if self.stop_reason is None and self.deadline is not None and now >= self.deadline:
            self.stop_reason = "max_time"
        due = bool(self.checkpoint_interval) and now >= self.next_checkpoint
        reason, due = self.world.max_of([STOP_REASONS.index(self.stop_reason), int(due)])
        self.stop_reason = STOP_REASONS[reason]
        if self.stop_reason:
            return True
        if due:
            self.save_checkpoint()
            self.next_checkpoint = now + self.checkpoint_interval
        return False

    # -- checkpoints -------------------------------------------------------------------------
    def epoch_seconds(self):
        """Wall time spent in the current epoch, over every stretch of it (resumes included)."""
        return self.sums.get("seconds", 0.0) + time.time() - self.stretch_started

    def state(self, rank_rngs):
        sums = dict(self.sums, seconds=self.epoch_seconds())
        return {"config": self.config, "epoch": self.epoch, "stage": self.stage, "step": self.step,
                "fusion": self.fusion.state_dict(), "recon": self.recon.state_dict(),
                "lpn": self.lpn.state_dict(), "opt_fusion": self.opt_fusion.state_dict(),
                "opt_recon": self.opt_recon.state_dict(), "lpn_grads": self.lpn_update.pending,
                "sums": sums, "crop_rng": self.crop_rng.get_state(), "torch_rng": rank_rngs[0],
                **({"rank_rngs": rank_rngs} if len(rank_rngs) > 1 else {})}

    def save_checkpoint(self):
        """Rank 0 writes checkpoint.pt (all ranks must call this: it gathers their generators)."""
        import torch

        from utils.checkpoint import save_atomic
        rank_rngs = self.world.gather(torch.get_rng_state())
        if self.world.main:
            save_atomic(self.state(rank_rngs), os.path.join(self.run_dir, "checkpoint.pt"))

    def restore(self, state):
        import torch
        self.epoch, self.stage, self.step = state["epoch"], state["stage"], state["step"]
        for name in ("fusion", "recon", "lpn", "opt_fusion", "opt_recon"):
            getattr(self, name).load_state_dict(state[name])
        self.lpn_update.pending = state["lpn_grads"]
        self.sums = state["sums"]
        self.crop_rng.set_state(state["crop_rng"])
        rank_rngs = state.get("rank_rngs", [state["torch_rng"]])
        if len(rank_rngs) == self.world.size:
            torch.set_rng_state(rank_rngs[self.world.rank])
        else:  # resumed by another number of processes: each rank's generator starts afresh
            torch.manual_seed(rank_seed(self.config["seed"], self.world.rank) + self.epoch)

    def save_weights(self):
        from utils.checkpoint import save_weights
        if not self.world.main:
            return
        for name, net in (("ReFusion", self.fusion), ("LPN", self.lpn), ("ReN", self.recon)):
            save_weights(net, os.path.join(self.run_dir, f"{name}_epoch{self.epoch + 1}.pth"),
                         os.path.join(self.run_dir, f"{name}.pth"))

    def save_samples(self, count=4):
        """``samples_epoch<N>.png``: rows of source A | source B | fused for fixed training pairs."""
        import torch

        from utils.image import write_png
        if not self.world.main:
            return
        sources = self.pairs[:count].to(self.device, torch.float32) / 255
        with torch.no_grad():
            fused = self.fusion.eval()(sources)
        self.fusion.train()
        rows = torch.cat([sources[:, :1], sources[:, 1:], fused], dim=3)  # (n,1,P,3P)
        grid = (rows.flatten(0, 2) * 255).round().byte().cpu().numpy()
        write_png(os.path.join(self.run_dir, f"samples_epoch{self.epoch + 1}.png"), grid)

    # -- the schedule ------------------------------------------------------------------------
    def loss_weights(self):
        return loss_weights_at(self.config, self.epoch)

    def window(self):
        """The next crop window; every rank draws every window, so the ranks' generators stay equal."""
        from utils.data import crop_window
        return crop_window(self.pairs.shape[-1], self.config["crop"], self.crop_rng)

    def batch(self, indices, window):
        """The global batch ``indices`` cut to ``window``."""
        from utils.data import make_batch
        return make_batch(self.pairs, indices, window, self.device)

    def share(self, batch):
        """This rank's equal slice of a global batch."""
        size = len(batch) // self.world.size
        return batch[self.world.rank * size:(self.world.rank + 1) * size]

    def meta_round(self, batches, meta_steps, rate, lpn_rate, weights):
        """Stage-1 pairs ``step, step+1, ...``: one per rank, all in the same accumulation group of
        P, so that they all see the same P. Their meta-gradients are summed over the ranks and
        added to P's update exactly as one process would add them one by one."""
        import torch

        from utils.data import meta_pair
        from utils.meta import lpn_meta_gradient, pair_coefficients
        first, group = self.step, self.config["accumulation_steps"]
        end = min(first + self.world.size, (first // group + 1) * group, meta_steps)
        windows = [(self.window(), self.window()) for _ in range(first, end)]
        mine = first + self.world.rank
        if mine < end:
            inner, outer = meta_pair(weights.meta_rule, mine)
            inner_window, outer_window = windows[mine - first]
            loss, grads = lpn_meta_gradient(self.fusion, self.recon, self.lpn,
                                            self.batch(batches[inner], inner_window),
                                            self.batch(batches[outer], outer_window), rate, weights,
                                            pair_coefficients(weights, mine, group))
        else:  # more ranks than pairs left in the group
            loss, grads = torch.zeros((), device=self.device), [torch.zeros_like(p) for p in self.lpn.parameters()]
        *grads, loss = self.world.sum([*grads, loss])
        self.lpn_update.add(grads, end - 1, meta_steps, lpn_rate)
        self.sums["meta"] += loss.item()
        self.sums["meta_n"] += end - first
        self.step = end

    def set_rate(self, rate):
        """F's and R's optimisers step at ``rate`` from now on."""
        for optimiser in (self.opt_fusion, self.opt_recon):
            for group in optimiser.param_groups:
                group["lr"] = rate

    def fusion_round(self, batches, weights):
        """Stage-2 step ``step``: each rank steps on its share of the batch; the wrappers average
        F's and R's gradients over the ranks, so every rank takes the same optimiser step."""
        from utils.meta import fusion_step
        loss_f, loss_r = fusion_step(self.train_fusion, self.train_recon, self.lpn,
                                     self.share(self.batch(batches[self.step], self.window())), weights,
                                     self.opt_fusion, self.opt_recon)
        loss_f, loss_r = self.world.mean_of([loss_f, loss_r])
        self.sums["fusion"] += loss_f
        self.sums["recon"] += loss_r
        self.sums["fusion_n"] += 1
        self.step += 1

    def run(self):
        from functools import partial

        from tqdm import tqdm

        from utils.data import epoch_batches, fusion_steps_per_epoch, meta_pairs_per_epoch

        c = self.config
        while self.epoch < c["epochs"]:
            rate, lpn_rate = lr_at(c, self.epoch), lr_at(c, self.epoch, "lpn_lr")
            self.set_rate(rate)
            batches = epoch_batches(len(self.pairs), c["batch_size"], c["seed"], self.epoch)
            weights = self.loss_weights()
            meta_steps = meta_pairs_per_epoch(c["meta_rule"], len(batches), c["max_meta_step"])
            fusion_steps = fusion_steps_per_epoch(len(self.pairs), c["batch_size"], c["max_fusion_steps"])
            # rank 0 reports; into a log file (no terminal) a line a minute, not one per step
            bar_of = partial(tqdm, disable=not self.world.main,
                             mininterval=0.1 if sys.stderr.isatty() else 60)
            if self.stage == "meta":
                bar = bar_of(desc=f"epoch {self.epoch + 1} loss learning", unit="pair",
                             initial=self.step, total=meta_steps)
                while self.step < meta_steps:
                    if self.at_step_boundary():
                        return False
                    done = self.step
                    self.meta_round(batches, meta_steps, rate, lpn_rate, weights)
                    bar.set_postfix(outer=f"{self.sums['meta'] / self.sums['meta_n']:.4f}", refresh=False)
                    bar.update(self.step - done)
                bar.close()
                self.stage, self.step = "fusion", 0
            bar = bar_of(range(self.step, fusion_steps), desc=f"epoch {self.epoch + 1} fusion learning",
                         unit="batch", initial=self.step, total=fusion_steps)
            for _ in bar:
                if self.at_step_boundary():
                    return False
                self.fusion_round(batches, weights)
                bar.set_postfix(fusion=f"{self.sums['fusion'] / self.sums['fusion_n']:.4f}",
                                recon=f"{self.sums['recon'] / self.sums['fusion_n']:.4f}", refresh=False)
            self.finish_epoch(rate, self.epoch_seconds())
        return True

    def finish_epoch(self, rate, seconds):
        s = self.sums
        row = [self.epoch + 1, s["meta"] / max(s["meta_n"], 1), s["fusion"] / max(s["fusion_n"], 1),
               s["recon"] / max(s["fusion_n"], 1), rate, round(seconds, 1)]
        log = os.path.join(self.run_dir, "log.csv")
        if self.world.main:
            new = not os.path.exists(log)
            with open(log, "a") as stream:
                if new:
                    stream.write("epoch,meta_outer_loss,fusion_loss,recon_loss,lr,seconds\n")
                stream.write(",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + "\n")
        self.save_weights()
        self.save_samples()
        self.epoch, self.stage, self.step = self.epoch + 1, "meta", 0
        self.sums, self.stretch_started = empty_sums(), time.time()
        self.save_checkpoint()
        if self.checkpoint_interval:
            self.next_checkpoint = time.monotonic() + self.checkpoint_interval


def new_run_dir(exp_dir):
    stamp = time.strftime("%Y%m%d_%H%M%S")
    path, n = os.path.join(exp_dir, stamp), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(exp_dir, f"{stamp}_{n}")
    os.makedirs(path)
    return path


def train(argv):
    """Run training; returns (run_dir, finished, stop_reason)."""
    from utils.checkpoint import read_checkpoint
    from utils.distributed import LostRanksError, join, launched_world_size, lost_contact
    from utils.runtime import parse_duration, resolve_device

    config = parse_config(argv)
    state = None
    if config["resume"]:
        state = read_checkpoint(config["resume"])
        if not isinstance(state, dict) or "fusion" not in state or "config" not in state:
            raise TrainError(f"{config['resume']} is not a train.py checkpoint.pt")
        # how to run, not what to train: taken from this command line, not the checkpoint
        overrides = {k: config[k] for k in ("device", "threads", "max_time", "checkpoint_every",
                                            "dist_timeout")}
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
        trainer.restore(state)
        say(f"resuming {run_dir} at epoch {trainer.epoch + 1}, {trainer.stage} step {trainer.step}")
    else:
        if world.main:
            with open(os.path.join(run_dir, "config.json"), "w") as stream:
                json.dump(config, stream, indent=2)
        say(f"run folder: {run_dir}" + (f" ({world.size} processes)" if world.size > 1 else ""))

    def request_stop(signum, _frame):
        if trainer.stop_reason in ("SIGINT", "SIGTERM"):
            return  # under a launcher, which forwards the terminal's signal: its SIGKILL aborts
        trainer.stop_reason = signal.Signals(signum).name
        if world.size == 1:  # a second signal stops at once: Ctrl-C raises KeyboardInterrupt, SIGTERM terminates
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        say(f"\n{trainer.stop_reason}: stopping after this step"
            + (" (again to abort without saving)" if world.size == 1 else ""), file=sys.stderr)

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        trainer.start_clock()
        finished = trainer.run()
        if not finished:
            trainer.save_checkpoint()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    if not finished:
        why = f"--max_time {config['max_time']} reached; " if trainer.stop_reason == "max_time" else ""
        launcher = "torchrun ... train.py" if world.size > 1 else "python train.py"
        say(f"{why}saved {checkpoint}; continue with {launcher} --resume {checkpoint}"
            + (" (any number of processes)" if world.size > 1 else ""), file=sys.stderr)
    else:
        say(f"done: {os.path.join(run_dir, 'ReFusion.pth')}")
    return run_dir, finished, trainer.stop_reason


# exit codes of a stopped run: --max_time is a planned stop; a signal gives the shell's 128 + N
STOP_EXIT = {"max_time": 0, "SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM}


def main(argv=None):
    from utils.distributed import launched_rank, launched_world_size

    def action():
        _, finished, reason = train(sys.argv[1:] if argv is None else argv)
        return 0 if finished else STOP_EXIT[reason]
    return run_script(action, "aborted; the last checkpoint.pt is intact",
                      rank=launched_rank() if launched_world_size() > 1 else None)


if __name__ == "__main__":
    from utils.distributed import exit_process, launched_world_size
    from utils.runtime import keep_freed_memory
    keep_freed_memory()
    code = main()
    if launched_world_size() > 1:
        exit_process(code)
    sys.exit(code)
