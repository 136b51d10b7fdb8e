"""Data-parallel training across processes started by torchrun (or any launcher that sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, such as ``srun`` with those exported).

A single process is a world of one and calls no ``torch.distributed`` function at all, so a plain
``python train.py`` runs exactly as before. Every collective below is called by all ranks at the
same point of the schedule; they are how the ranks agree (on gradients, losses, when to stop).
"""
import datetime
import os
import sys
import warnings

import torch
import torch.distributed as dist

from utils.errors import UserError

# Convolutions on channels-last maps return weight gradients whose size-1 dims have other strides
# than the weights; DDP then copies those few kilobytes with a strided copy and says so each run.
warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")


class DistributedError(UserError):
    pass


def launched_world_size():
    """The number of training processes the launcher started (1 without one)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank():
    return int(os.environ.get("RANK", "0"))


class World:
    """This process's place among the training processes: ``rank`` of ``size``; rank 0 is the
    one that writes. Made by ``join``."""

    def __init__(self, rank=0, size=1, device=torch.device("cpu")):
        self.rank, self.size, self.device = rank, size, device

    @property
    def main(self):
        return self.rank == 0

    def sum(self, tensors):
        """Element-wise sums over the ranks of a list of tensors (one all-reduce)."""
        if self.size == 1:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def mean_of(self, values):
        """Means over the ranks of a list of floats."""
        if self.size == 1:
            return list(values)
        total = self.sum([torch.tensor(values, dtype=torch.float64, device=self.device)])[0]
        return (total / self.size).tolist()

    def max_of(self, values):
        """Maxima over the ranks of a list of ints: how the ranks agree on a decision that any
        one of them may have reached (a signal, the deadline)."""
        if self.size == 1:
            return list(values)
        flags = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags.tolist()

    def from_main(self, value):
        """Rank 0's ``value`` (any picklable object), on every rank."""
        if self.size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def gather(self, value):
        """Every rank's ``value`` as a list in rank order, on every rank."""
        if self.size == 1:
            return [value]
        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def share(self, batch):
        """This rank's equal slice of a global batch (the whole batch in a world of one)."""
        size = len(batch) // self.size
        return batch[self.rank * size:(self.rank + 1) * size]

    def wrap(self, module):
        """``module`` as DistributedDataParallel (gradients averaged over the ranks in backward);
        the module itself in a world of one."""
        if self.size == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def leave(self):
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def exit_process(code):
    """End a process of a multi-process run with exit code ``code``, skipping the interpreter's
    shutdown (output is flushed first; every file has been closed by then).

    A gloo worker thread frees the tensors of a finished collective just after the collective
    returns, and freeing a tensor that Python has let go of takes the GIL. Should the main thread
    reach interpreter shutdown first, Python ends that thread inside a C++ destructor and the
    process aborts ("terminate called without an active exception", SIGABRT) after a run that
    went well, which the launcher reports as a failure and answers by killing the other ranks.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def join(device, timeout_seconds):
    """This process's ``World`` on ``device`` (a ``torch.device`` from ``resolve_device``).

    Under a launcher each local rank takes its own GPU (``cuda:LOCAL_RANK``) and NCCL, or the CPU
    and gloo. A collective that waits longer than ``timeout_seconds`` (for a rank that died or
    hangs) raises instead of blocking for ever.
    """
    size = launched_world_size()
    if size == 1:
        return World(device=device)
    if device.type == "mps":
        raise DistributedError("training with several processes needs CUDA or the CPU; "
                               "MPS has no torch.distributed backend")
    rank, local_rank = launched_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"local rank {local_rank} has no GPU: this node has "
                                   f"{torch.cuda.device_count()}; start at most that many "
                                   f"processes per node (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_seconds),
                            device_id=device if device.type == "cuda" else None)
    return World(rank, size, device)


class LostRanksError(DistributedError):
    """A collective failed: another rank died, hung past ``--dist_timeout`` or lost its network."""
    every_rank = True


def lost_contact(error):
    """Whether ``error`` (raised in a run of several processes) says that a collective failed.
    gloo reports a dead or silent peer as a plain RuntimeError that names it; NCCL and the
    rendezvous as a ``DistError``."""
    text = str(error)
    return (launched_world_size() > 1 and isinstance(error, RuntimeError)
            and (isinstance(error, dist.DistError) or "gloo" in text or "Connection closed" in text))
