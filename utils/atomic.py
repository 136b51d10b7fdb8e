"""Atomic file writes: a temporary file in the target folder, then a rename over the target."""
import os
import tempfile


def write_atomic(path, write):
    """``write(temporary_path)`` then rename it to ``path``; an interrupted write leaves no partial
    file, and an error (disk full, permission) names ``path``. The result gets the usual permissions
    (umask), not mkstemp's private 0600."""
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
    except BaseException as error:
        if os.path.exists(temporary):
            os.remove(temporary)
        if isinstance(error, OSError) and error.errno is not None:
            # name the file the user asked for, not our temporary one
            raise type(error)(error.errno, error.strerror, path) from None
        raise


def write_bytes_atomic(path, data):
    """``data`` to ``path`` atomically, through Python's own file writes: a full disk or a file
    size limit is an ``OSError`` that names ``path`` (``torch.save`` and numpy's ``tofile`` would
    raise other errors, or none that names the file)."""
    def write(temporary):
        with open(temporary, "wb") as stream:
            stream.write(data)
    write_atomic(path, write)

