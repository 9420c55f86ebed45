"""Resume keys, derived from what a stage declares it reads.

Every stage declares a :class:`StageInputs`: the config sections it reads and a function naming the
artifacts it consumes (upstream outputs, input files) and the few other values its output depends
on. Its resume key (stored in the output's ``_stage.json``) is the hash of those sections and of
the artifacts' fingerprints — by content, never by path — so a stage whose inputs changed cannot
reuse stale outputs, and one whose inputs did not is skipped. ``docs/architecture.md`` lists the
declarations; ``tests/test_stage_chain.py`` walks the chain.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from ulrec.config import Config, section_hash
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
    resume key in its ``_stage.json`` (what it was made from); any other by its files' contents."""
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


def fingerprint(value: Any) -> Any:
    """Paths by content (:func:`path_fingerprint`), sequences element-wise, other values as they are."""
    if isinstance(value, Path):
        return path_fingerprint(value)
    if isinstance(value, (list, tuple)):
        return [fingerprint(v) for v in value]
    return value


def _no_artifacts(cfg: Config, **params: Any) -> Mapping[str, Any]:
    return {}


@dataclass(frozen=True)
class StageInputs:
    """What a stage reads: config ``sections`` and ``artifacts(cfg, **params)`` (name → a Path,
    fingerprinted by content, or a plain value). ``params`` are what one call of the stage is about
    (a method's model directory, the users it plays)."""

    name: str
    sections: tuple[str, ...]
    artifacts: Callable[..., Mapping[str, Any]] = field(default=_no_artifacts)


def resume_key(stage: StageInputs, cfg: Config, **params: Any) -> str:
    """The resume key of one call of ``stage``: its sections, its artifacts' fingerprints, the seed."""
    artifacts = {name: fingerprint(value) for name, value in stage.artifacts(cfg, **params).items()}
    return section_hash(cfg, *stage.sections, extra={"stage": stage.name, "seed": cfg.run.seed, **artifacts})
