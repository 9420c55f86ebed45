"""Loading a saved user model of any kind (``meta.json`` says which).

Separate from :mod:`ulrec.simulator.user_models` so the dependencies point one way: the model kinds
(``user_models``, ``deepfm``) know nothing of each other, and this module knows them all.
"""

from __future__ import annotations

import functools
from pathlib import Path

from ulrec.errors import DataError
from ulrec.io import read_json
from ulrec.simulator.user_models import META_FILE, MatrixUserModel, UserModel


def load_user_model(directory: str | Path) -> UserModel:
    """Load a user model saved with ``save`` (any kind)."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: file not found (no saved user model in {directory})")
    meta = read_json(meta_path)
    kind = meta.get("kind")
    if kind == "matrix":
        return MatrixUserModel._load(directory)
    if kind == "published":
        return MatrixUserModel.from_published(meta["directory"], meta["dataset"], meta["split"])
    if kind == "deepfm":
        # Imported here: torch and deepctr-torch only when a DeepFM model is loaded.
        from ulrec.simulator.deepfm import DeepFMUserModel

        return DeepFMUserModel._load(directory, meta)
    raise DataError(f"{meta_path}: unknown user model kind {kind!r}")


@functools.lru_cache(maxsize=8)
def cached_user_model(directory: str) -> UserModel:
    """One loaded user model per directory and process (RLlib sub-envs share it read-only)."""
    return load_user_model(directory)
