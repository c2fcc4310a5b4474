"""Small shared helpers: atomic writes (write to a temporary path, then rename) and environment defaults."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator


def atomic_write(path: os.PathLike, write: Callable[[IO], None], binary: bool = False) -> Path:
    """Call ``write(f)`` on a temporary file in ``path``'s folder, fsync, then rename it to ``path`` (atomic); on any
    failure the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    return atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def atomic_output_dir(final: os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``final``; on success it replaces ``final`` by renames, on any error it is
    deleted and ``final`` is untouched. Nothing half-written ever appears at ``final``."""
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (use --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_json(path: os.PathLike, what: str, error: Callable[[str], Exception] = ValueError,
              object_only: bool = False) -> Any:
    """The parsed JSON file ``path`` (UTF-8); ``error(message)`` is raised, naming ``what`` and the file, when it does
    not exist, is not JSON, or (``object_only``) holds something other than a JSON object. Any other ``OSError``
    (permissions, a failing disk, a directory) is raised as it is: it may be transient, and an engine must be able
    to tell it from a file that will stay broken."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what}: {path} does not exist") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise error(f"{what}: {path} is not valid JSON ({e})") from None
    if object_only and not isinstance(value, dict):
        raise error(f"{what}: {path} must hold a JSON object, not {type(value).__name__}")
    return value
