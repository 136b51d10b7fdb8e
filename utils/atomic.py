"""Atomic file writes: a temporary file in the target folder, then a rename over the target."""
import os
import tempfile


def write_atomic(path, write):
    """``write(temporary_path)`` then rename it to ``path``; an interrupted write leaves no partial
    file. The result gets the usual permissions (umask), not mkstemp's private 0600."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".partial", dir=folder)
    os.close(handle)
    try:
        write(temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
