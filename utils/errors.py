"""The base of every user-facing error, and how the command-line scripts report them."""
import sys


class UserError(ValueError):
    """Bad input from the user (file, folder, checkpoint, option): reported as one line."""


def run_script(action, interrupted_message="interrupted"):
    """Run ``action()``; a ``UserError``, a failed file operation or running out of memory prints
    one ``error:`` line and gives exit code 1, Ctrl-C gives 130. Otherwise the exit code is
    ``action()``'s (None: 0)."""
    try:
        return action() or 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # unwritable folder, disk full, a file where a folder should be
        print(f"error: {error.strerror or error}: {error.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except MemoryError:
        print("error: out of memory; use smaller images or batches, or --device cuda", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted_message, file=sys.stderr)
        return 130
