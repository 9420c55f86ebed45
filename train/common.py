"""Fingerprints of stage inputs, shared by the training stages."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ulrec.io import STAGE_FILE, read_json

# Files above this size are fingerprinted by size and mtime instead of content (model weights of
# an 8B model would take minutes to hash; they are written once and then only read).
_CONTENT_HASH_LIMIT = 256 * 1024**2


def file_fingerprint(path: Path) -> str:
    """Content hash of a file (size + mtime for very large files)."""
    stat = path.stat()
    if stat.st_size > _CONTENT_HASH_LIMIT:
        return f"{stat.st_size}:{stat.st_mtime_ns}"
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def path_fingerprint(path: str | Path) -> str:
    """Fingerprint of a file or directory. A directory finished by a stage is identified by the
    input hash in its ``_stage.json``; any other directory by the fingerprints of its files."""
    path = Path(path)
    if path.is_file():
        return file_fingerprint(path)
    marker = path / STAGE_FILE
    if marker.is_file():
        return f"stage:{read_json(marker).get('hash')}"
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path)}={file_fingerprint(file)};".encode())
    return digest.hexdigest()[:16]
