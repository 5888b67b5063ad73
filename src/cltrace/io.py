"""Atomic file writes: a kill at any moment leaves the old file or the new one, never half.

Every writer goes through `atomic_replace`: write a temporary file in the target's folder,
fsync it, rename it over the target; the temporary file is removed on any failure.
`sha256_file` is the checksum the stores and caches record for the files they write.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_replace(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call `write(tmp_path)` to fill a temporary file, then move it to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, payload: bytes) -> Path:
    def write(tmp: str) -> None:
        Path(tmp).write_bytes(payload)

    return atomic_replace(path, write)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(data: Any, path: str | Path, *, indent: int | None = 2, compact: bool = False) -> Path:
    """JSON (UTF-8); `compact` drops whitespace for large documents such as graphs."""
    if compact:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    else:
        text = json.dumps(data, ensure_ascii=False, indent=indent)
    return atomic_write_text(path, text)


def atomic_save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors file, atomically."""
    from safetensors.torch import save_file

    return atomic_replace(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 of a file's bytes."""
    # hashlib.file_digest is Python 3.11+; the package supports 3.10, so read in 1 MiB blocks.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
