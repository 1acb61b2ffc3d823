"""Files and folders that appear whole or not at all: everything is written under a temporary name beside its
target (same filesystem) and renamed into place when complete; an error or interruption removes the temporary."""

import contextlib
import errno
import json
import os
import shutil
import tempfile

import yaml


def refuse_existing(path: str, force: bool = False) -> None:
    """``ValueError`` if ``path`` exists and ``force`` is not set."""
    if os.path.exists(path) and not force:
        raise ValueError(f"{path} already exists; pass force=True (--force) to overwrite it")


def check_creatable(path: str) -> None:
    """``ValueError`` unless ``path`` (a file or folder, existing or not) can be written: its nearest existing
    ancestor must be a writable folder. Nothing is created, so a failed run leaves no empty folder behind."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent == os.path.abspath(path):  # it exists: a file to replace, or a folder to write into
        parent = parent if os.path.isdir(parent) else os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{path} cannot be written: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{path} cannot be written: no permission to write in {parent}")


def umask() -> int:
    """The process umask, read without changing it where /proc says it (``os.umask`` can only read it by setting
    it, which leaves a window in which another thread creates world-writable files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)  # the strictest mask for that window
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str, replace: bool = True):
    """A temporary file path to write; it becomes ``path`` (with the user's umask, not mkstemp's 0600) when the
    block succeeds. An error or an interruption (``cli.run`` turns SIGTERM into one) removes the temporary.

    ``replace=False`` never replaces an existing ``path``, not even one that appeared while the block ran:
    ``FileExistsError`` then, and the temporary is removed."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=os.path.splitext(name)[1])
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())
        if replace:
            os.replace(tmp, path)
        else:
            _publish_new(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _publish_new(tmp: str, path: str) -> None:
    """``tmp`` linked as ``path`` only if ``path`` does not exist (link(2) refuses atomically, rename(2) would
    not); the caller removes ``tmp``."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, "exists already, not replaced", path) from None
    except OSError:  # a filesystem without hard links: the check and the rename are then two steps
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "exists already, not replaced", path) from None
        os.replace(tmp, path)


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
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private
        if os.path.isdir(folder):  # moved aside first, so a reader never sees a half-replaced folder
            os.replace(folder, tmp + ".old")
        os.replace(tmp, folder)
    finally:
        for leftover in (tmp, tmp + ".old"):
            if os.path.exists(leftover):
                shutil.rmtree(leftover)


def write_json(path: str, obj, force: bool = True, indent: int | None = 2) -> None:
    """``obj`` as JSON (sorted keys; ``indent`` None: one line, for machine-read files such as a store index)."""
    refuse_existing(path, force)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, sort_keys=True)
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


def read_yaml(path: str, what: str) -> dict:
    """The YAML mapping in ``path`` (an empty file is an empty mapping); ``ValueError`` naming the file and ``what``
    it should hold (e.g. "recipe") when it is missing, unreadable or not a mapping."""
    try:
        with open(path) as f:
            obj = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read {what} {path}: {e}") from e
    obj = {} if obj is None else obj
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: a {what} is a mapping of keys to values, got {type(obj).__name__}")
    return obj
