"""The base of every user-facing error, and how the command-line scripts report them."""
import sys


class UserError(ValueError):
    """Bad input from the user (file, folder, checkpoint, option): reported as one line."""


def run_script(action, interrupted_message="interrupted", rank=None):
    """Run ``action()``; a ``UserError``, a failed file operation or running out of memory prints
    one ``error:`` line and gives exit code 1, Ctrl-C gives 130. Otherwise the exit code is
    ``action()``'s (None: 0).

    ``rank``: this process's rank among several training processes. Bad input is the same for all
    of them, so only rank 0 reports a ``UserError`` (unless it is ``every_rank``); other failures
    are reported by each rank that meets them, naming it. The other ranks leave such an error to
    rank 0 with exit code 0: a launcher ends every rank as soon as one fails, which would often
    end rank 0 before it has printed the error.
    """
    where = "" if rank is None else f"(rank {rank}) "

    def report(message, shared=False):
        if shared and rank:
            return 0
        print(f"error: {'' if shared else where}{message}", file=sys.stderr)
        return 1

    try:
        return action() or 0
    except UserError as error:
        return report(error, shared=not getattr(error, "every_rank", False))
    except OSError as error:  # unwritable folder, disk full, a file where a folder should be
        return report(f"{error.strerror or error}: {error.filename or ''}".rstrip(": "))
    except MemoryError:
        return report("out of memory; use smaller images or batches, or --device cuda")
    except KeyboardInterrupt:
        print(interrupted_message, file=sys.stderr)
        return 130
