"""Loading and saving weights with clear errors, and atomic writes."""
import os
import pickle
import warnings
import zipfile

import torch

from utils.atomic import write_atomic
from utils.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or of the wrong network (one-line message)."""


def save_atomic(obj, path):
    """``torch.save`` that never leaves a truncated checkpoint behind (see ``utils.atomic``)."""
    write_atomic(path, lambda temporary: torch.save(obj, temporary))


def save_weights(network, *paths):
    """``network``'s weights as CPU tensors (loadable anywhere), written atomically to each path."""
    weights = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    for path in paths:
        save_atomic(weights, path)


def read_checkpoint(path, hint=""):
    """``torch.load`` on CPU with tensors only; raises ``CheckpointError`` with a one-line reason."""
    if not os.path.isfile(path):
        raise CheckpointError(f"model not found: {path}" + (f" ({hint})" if hint else ""))
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
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: not a PyTorch weights file or "
                              f"corrupt ({reason[:200]})") from None


def load_weights(network, path, hint=""):
    """Load a state dict file into ``network`` strictly; errors name the file and what is wrong."""
    state = read_checkpoint(path, hint)
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
