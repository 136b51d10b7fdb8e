"""Loading and saving weights with clear errors, atomic writes, and a training run's folder and
checkpoint."""
import io
import os
import pickle
import time
import warnings
import zipfile

import torch

from utils.atomic import write_bytes_atomic
from utils.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or of the wrong network (one-line message)."""


def save_atomic(obj, path):
    """``torch.save`` that never leaves a truncated checkpoint behind (see ``utils.atomic``)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def save_weights(network, *paths):
    """``network``'s weights as CPU tensors (loadable anywhere), written atomically to each path."""
    weights = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    for path in paths:
        save_atomic(weights, path)


def first_sentence(text, limit=200):
    """The first sentence of an error message, whole, or its first ``limit`` characters and "..."."""
    text = " ".join(str(text).split())
    sentence = text.split(". ")[0].rstrip(".")
    return sentence if len(sentence) <= limit else sentence[:limit].rsplit(" ", 1)[0] + "..."


def read_checkpoint(path, hint="", what="model"):
    """``torch.load`` on CPU with tensors only; raises ``CheckpointError`` with a one-line reason
    (``what`` names the file when it is missing)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} not found: {path}" + (f" ({hint})" if hint else ""))
    try:
        with warnings.catch_warnings():  # torch.load's notes (pickle protocols, ...) are not for users
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message here advises loading with weights_only=False, i.e. running the file's code
        if zipfile.is_zipfile(path):
            raise CheckpointError(f"cannot read checkpoint {path}: it holds Python objects, not only "
                                  f"tensors (a whole pickled model?); save model.state_dict() instead. "
                                  f"Such files are never unpickled here, since that can run code") from None
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch weights file") from None
    except Exception as error:  # torch raises many types for damaged files
        reason = first_sentence(error) if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch weights file, or "
                              f"truncated or corrupt ({reason})") from None


def load_weights(network, path, hint=""):
    """Load a state dict file into ``network`` strictly; errors name the file and what is wrong."""
    state = read_checkpoint(path, hint)
    if isinstance(state, dict) and {"fusion", "config", "epoch"} <= set(state):
        beside = os.path.join(os.path.dirname(path) or ".", "ReFusion.pth")
        raise CheckpointError(f"{path} is train.py's checkpoint of a whole run, not weights; "
                              f"F's weights are in {beside} (or ReFusion_epoch<N>.pth) beside it")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} is not a state dict of tensors "
                              f"(expected the weights of {type(network).__name__})")
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        expected = set(network.state_dict())
        missing = sorted(expected - set(state) - {k.replace(".conv.weight", ".weight") for k in state})
        unexpected = sorted(set(state) - expected - {k for k in state if k.endswith(".conv.weight")})
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if not detail:
            detail.append(str(error).strip().splitlines()[-1].strip()[:200])
        raise CheckpointError(f"checkpoint {path} does not hold {type(network).__name__} weights "
                              f"of this configuration: {'; '.join(detail)}") from None
    return network


# -- a training run's checkpoint.pt (its format: ARCHITECTURE.md) --------------------------------
RUN_PARTS = ("fusion", "recon", "lpn", "opt_fusion", "opt_recon")


def run_state(run, seconds, rank_rngs):
    """checkpoint.pt's dict for ``run`` (``train.Trainer``): everything needed to resume bit for
    bit. ``seconds``: the current epoch's wall time so far; ``rank_rngs``: every rank's torch
    generator state."""
    return {"config": run.config, "epoch": run.epoch, "stage": run.stage, "step": run.step,
            **{part: getattr(run, part).state_dict() for part in RUN_PARTS},
            "lpn_grads": run.lpn_update.pending, "sums": dict(run.sums, seconds=seconds),
            "crop_rng": run.crop_rng.get_state(), "torch_rng": rank_rngs[0],
            **({"rank_rngs": rank_rngs} if len(rank_rngs) > 1 else {})}


def save_run(run, seconds):
    """``run``'s checkpoint.pt in its ``run_dir``, written by rank 0 of its world; every rank must
    call this, since it gathers their generators."""
    rank_rngs = run.world.gather(torch.get_rng_state())
    if run.world.main:
        save_atomic(run_state(run, seconds, rank_rngs), os.path.join(run.run_dir, "checkpoint.pt"))


def restore_run(run, state, rank, size, fresh_seed):
    """Put checkpoint.pt's ``state`` back into ``run``, and rank ``rank``'s torch generator; a run
    resumed by another number of processes seeds each rank's generator with ``fresh_seed``."""
    run.epoch, run.stage, run.step = state["epoch"], state["stage"], state["step"]
    for part in RUN_PARTS:
        getattr(run, part).load_state_dict(state[part])
    run.lpn_update.pending = state["lpn_grads"]
    run.sums = state["sums"]
    run.crop_rng.set_state(state["crop_rng"])
    rank_rngs = state.get("rank_rngs", [state["torch_rng"]])
    if len(rank_rngs) == size:
        torch.set_rng_state(rank_rngs[rank])
    else:
        torch.manual_seed(fresh_seed)


def new_run_dir(exp_dir):
    """A new ``<exp_dir>/<YYYYmmdd_HHMMSS>[_N]`` folder."""
    stamp = time.strftime("%Y%m%d_%H%M%S")
    path, n = os.path.join(exp_dir, stamp), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(exp_dir, f"{stamp}_{n}")
    os.makedirs(path)
    return path


def save_samples(fusion, pairs, device, path, count=4):
    """Rows of source A | source B | F's result for the first ``count`` training pairs, as a PNG."""
    from utils.image import write_png
    sources = pairs[:count].to(device, torch.float32) / 255
    with torch.no_grad():
        fused = fusion.eval()(sources)
    fusion.train()
    rows = torch.cat([sources[:, :1], sources[:, 1:], fused], dim=3)  # (n,1,P,3P)
    write_png(path, (rows.flatten(0, 2) * 255).round().byte().cpu().numpy())

