"""Files and folders that appear whole or not at all: everything is written under a temporary name beside its
target (same filesystem) and renamed into place when complete; an error or interruption removes the temporary."""

import contextlib
import json
import os
import shutil
import tempfile


def refuse_existing(path: str, force: bool = False) -> None:
    """``ValueError`` if ``path`` exists and ``force`` is not set."""
    if os.path.exists(path) and not force:
        raise ValueError(f"{path} already exists; pass force=True (--force) to overwrite it")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str):
    """A temporary file path to write; it replaces ``path`` (with the user's umask, not mkstemp's 0600) when the
    block succeeds."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=os.path.splitext(name)[1])
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def staged_folder(folder: str, replace: bool = False):
    """A new temporary folder beside ``folder`` to write into; it becomes ``folder`` only when the block succeeds.
    ``folder`` must be absent or empty, unless ``replace``: then an existing one is swapped out at the end."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"{folder} exists and is not a folder")
    if os.path.isdir(folder) and os.listdir(folder) and not replace:
        raise ValueError(f"{folder} exists and is not empty; refusing to overwrite")
    parent, name = os.path.split(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}-")
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private
        if os.path.isdir(folder):  # moved aside first, so a reader never sees a half-replaced folder
            os.replace(folder, tmp + ".old")
        os.replace(tmp, folder)
    finally:
        for leftover in (tmp, tmp + ".old"):
            if os.path.exists(leftover):
                shutil.rmtree(leftover)


def write_json(path: str, obj, force: bool = True) -> None:
    refuse_existing(path, force)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path: str) -> dict:
    """A JSON object from ``path``; ``ValueError`` naming the file when it is missing, unreadable or not an object."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, expected an object")
    return obj
