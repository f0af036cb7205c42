"""Paths a run writes to, checked before it starts.

A run writes its output folder, MLflow's sqlite file (or file store) and MLflow's artifacts
folder. :func:`check_folder` and :func:`check_file` find what would make writing there fail
once the run is under way (a NUL in the name, a file name longer than the file system takes,
a path longer than it takes, a file where a folder must be, a folder that cannot be written)
and raise one :class:`~fedcl.errors.ConfigError` line. They create nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedcl.errors import ConfigError

#: What a file name and a whole path may take, in bytes, where the file system does not say
#: (``os.pathconf``): Linux's NAME_MAX and PATH_MAX.
NAME_MAX = 255
PATH_MAX = 4096


def shown(text: str, limit: int = 80) -> str:
    """``text`` for a one-line message: control characters escaped, and a long one shortened
    in the middle, with its length."""
    flat = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
    if len(flat) <= limit:
        return flat
    return f"{flat[:limit // 2]}...{flat[-(limit // 4):]} ({len(text)} characters)"


def quoted(text: str, limit: int = 60) -> str:
    """A name in quotes for a one-line message (:func:`shown`), its length after the quotes
    when it is shortened."""
    flat = shown(text, limit)
    if len(flat) <= limit:
        return f"'{flat}'"
    head, _, count = flat.rpartition(" (")
    return f"'{head}' ({count}"


def name_bytes(name: str) -> int:
    """The bytes ``name`` takes as a file name; raises ConfigError for text that is not one."""
    try:
        return len(os.fsencode(name))
    except UnicodeEncodeError:
        raise ConfigError(f"{shown(name)} cannot be a file name: it is not valid text for "
                          "the file system") from None


def _writable(folder: Path) -> bool:
    """Whether this process may create entries in ``folder`` (by its effective ids)."""
    effective = {"effective_ids": True} if os.access in os.supports_effective_ids else {}
    return os.access(folder, os.W_OK | os.X_OK, **effective)


def _existing(path: Path) -> Path:
    """``path`` itself when it exists, else its nearest existing ancestor."""
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or "/")


def _limit(folder: Path, name: str, default: int) -> int:
    try:
        value = os.pathconf(folder, name)
    except (OSError, ValueError):
        return default
    return value if value and value > 0 else default


def check_names(path: str | os.PathLike[str], what: str, reserve: int = 0
                ) -> tuple[Path, Path]:
    """Check that ``path`` can name a file at all: no NUL, every name within the file
    system's NAME_MAX, the whole (absolute, with ``reserve`` more bytes for what fedcl writes
    inside it) within PATH_MAX. Returns the absolute path and its nearest existing part."""
    text = os.fspath(path)
    if "\0" in text:
        raise ConfigError(f"{what} {shown(text)} contains a NUL character")
    if not text.strip():
        raise ConfigError(f"{what} must be a non-empty path")
    full = Path(os.path.abspath(text))
    existing = _existing(full)
    folder = existing if existing.is_dir() else existing.parent
    name_max = _limit(folder, "PC_NAME_MAX", NAME_MAX)
    path_max = _limit(folder, "PC_PATH_MAX", PATH_MAX)
    for part in full.parts[1:]:
        size = name_bytes(part)
        if size > name_max:
            raise ConfigError(f"{what} {shown(text)}: the name {shown(part, 40)} is {size} "
                              f"bytes long, and file names here take at most {name_max}")
    size = name_bytes(str(full)) + reserve
    if size >= path_max:
        extra = f" with the {reserve} bytes fedcl's files need in it" if reserve else ""
        raise ConfigError(f"{what} {shown(text)} is too long: {size} bytes as an absolute "
                          f"path{extra}, and paths here take at most {path_max - 1}")
    return full, existing


def _check_makeable(text: str, what: str, existing: Path) -> None:
    """The missing parts of a path can be made under ``existing``, its nearest existing part."""
    if not existing.is_dir():
        raise ConfigError(f"{what} {shown(text)} cannot be made: {shown(str(existing))} is a "
                          "file, not a folder")
    if not _writable(existing):
        raise ConfigError(f"{what} {shown(text)} cannot be made: {shown(str(existing))} is "
                          "not writable")


def check_folder(path: str | os.PathLike[str], what: str, reserve: int = 0) -> Path:
    """Raise a one-line ConfigError unless ``path`` is a writable folder or one that can be
    made (:func:`check_names` first); returns it as an absolute path."""
    text = os.fspath(path)
    full, existing = check_names(text, what, reserve)
    if existing != full:
        _check_makeable(text, what, existing)
    elif not full.is_dir():
        raise ConfigError(f"{what} {shown(text)} is a file, not a folder")
    elif not _writable(full):
        raise ConfigError(f"{what} {shown(text)} is not writable")
    return full


def check_file(path: str | os.PathLike[str], what: str) -> Path:
    """Raise a one-line ConfigError unless ``path`` is a file this process can read and write
    in a writable folder (a database keeps its journal beside it), or one that can be made;
    returns it as an absolute path."""
    text = os.fspath(path)
    full, existing = check_names(text, what)
    if existing != full:
        _check_makeable(text, what, existing)
        return full
    if full.is_dir():
        raise ConfigError(f"{what} {shown(text)} is a folder, not a file")
    effective = {"effective_ids": True} if os.access in os.supports_effective_ids else {}
    if not os.access(full, os.R_OK | os.W_OK, **effective):
        raise ConfigError(f"{what} {shown(text)} is not writable")
    if not _writable(full.parent):
        raise ConfigError(f"{what} {shown(text)} cannot be written: its folder "
                          f"{shown(str(full.parent))} is not writable")
    return full
