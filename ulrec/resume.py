"""Resume keys, derived from what a stage declares it reads.

Every stage declares a :class:`StageInputs`: the config sections it reads and a function naming the
artifacts it consumes (upstream outputs, input files) and the few other values its output depends
on. Its resume key (stored in the output's ``_stage.json``) is the hash of those sections and of
the artifacts' fingerprints — by content, never by path — so a stage whose inputs changed cannot
reuse stale outputs, and one whose inputs did not is skipped. ``docs/architecture.md`` lists the
declarations; ``tests/test_stage_chain.py`` walks the chain.

:func:`run_stage` is the one runner every stage goes through: it derives the key, skips a call whose
outputs exist for it, and otherwise builds the outputs and then marks them done. Stage code never
reads or writes the ``_stage.json`` marker itself.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from ulrec.config import Config, section_hash
from ulrec.io import STAGE_FILE, read_json, write_json

R = TypeVar("R")

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


def finished_marker(out_dir: Path, key: str, required: Sequence[str] = ()) -> dict[str, Any] | None:
    """The marker of ``out_dir`` when it holds a finished call with resume key ``key`` (and the
    ``required`` files, relative to it); else None."""
    marker = Path(out_dir) / STAGE_FILE
    try:
        info = read_json(marker) if marker.is_file() else None
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("hash") != key:
        return None
    if not all((Path(out_dir) / name).exists() for name in required):
        return None
    return info


def run_stage(
    stage: StageInputs,
    cfg: Config,
    out_dir: Path,
    build: Callable[[str], tuple[R, Mapping[str, Any]]],
    *,
    skipped: Callable[[dict[str, Any]], R],
    required: Sequence[str] = (),
    **params: Any,
) -> R:
    """Run one call of ``stage`` writing ``out_dir``, or skip it.

    When ``out_dir`` is finished for this call's resume key, returns ``skipped(marker)``. Otherwise
    ``build(key)`` writes the outputs (atomically, each stage its own way) and returns ``(result,
    info)``; the runner then writes the marker with ``info`` — last, so an interrupted build is never
    taken for a finished one — and returns ``result``."""
    key = resume_key(stage, cfg, **params)
    marker = finished_marker(out_dir, key, required)
    if marker is not None:
        return skipped(marker)
    # A stale marker goes first: a build that writes in place and is interrupted must not leave
    # half-rewritten outputs under the previous inputs' key.
    (Path(out_dir) / STAGE_FILE).unlink(missing_ok=True)
    result, info = build(key)
    mark_done(out_dir, key, stage.name, **info)
    return result


def mark_done(out_dir: Path, key: str, stage_name: str, **info: Any) -> None:
    """Mark ``out_dir`` finished under resume key ``key`` (the marker is written atomically)."""
    write_json(Path(out_dir) / STAGE_FILE, {**info, "hash": key, "stage": stage_name})
