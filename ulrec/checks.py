"""Input checks every stage runs before it starts work (and before any Ray actor starts).

Each check turns a bad model directory, a truncated Parquet file or a diverged model into one
:class:`~ulrec.errors.DataError` line naming the file, instead of a traceback from deep inside
transformers, vLLM or Arrow (often from a dead actor, minutes later).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from ulrec.errors import DataError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"


def _weight_files(path: Path) -> list[Path]:
    """The weight files a directory's index names (or its single weight file); DataError if none."""
    for index_name in (SAFETENSORS_INDEX, TORCH_INDEX):
        index = path / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise DataError(f"model directory {path}: {index_name} is not a valid weight index") from None
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise DataError(f"model directory {path}: weight shard {missing[0]} named by {index_name} is missing")
            return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise DataError(f"model directory {path} has no weights (*.safetensors or pytorch_model.bin)")
    return files


def check_model_dir(path: str | Path, what: str = "model directory") -> Path:
    """A Hugging Face model directory that will load: a parseable config, a tokenizer that loads and
    weight files whose headers read. Cheap (no weights are loaded), so every stage can afford it."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"{what} {path} does not exist (or is not a directory)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DataError(f"{what} {path} has no config.json (not a Hugging Face model directory)")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError):
        raise DataError(f"{what} {path}: config.json is not valid JSON") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise DataError(f"{what} {path}: config.json has no model_type")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise DataError(f"{what} {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    for weights in _weight_files(path):
        if weights.suffix == ".safetensors":
            _check_safetensors(weights, what)
        elif weights.stat().st_size == 0:
            raise DataError(f"{what} {path}: {weights.name} is empty")
    try:
        from transformers import AutoConfig, AutoTokenizer

        AutoConfig.from_pretrained(path)
        AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # any loader failure is a property of the directory
        raise DataError(f"{what} {path} does not load: {_one_line(exc)}") from None
    return path


def _check_safetensors(file: Path, what: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as exc:
        raise DataError(f"{what}: {file} is not a readable safetensors file ({_one_line(exc)})") from None
    if not keys:
        raise DataError(f"{what}: {file} holds no tensors")


def check_parquet(path: str | Path, what: str) -> Path:
    """A Parquet file (or a directory of them) whose footer and schema read."""
    import pyarrow.parquet as pq

    path = Path(path)
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise DataError(f"{what} not found: {path}")
    for file in files:
        try:
            pq.read_metadata(file)
        except Exception as exc:
            raise DataError(f"{what}: {file} is not a readable Parquet file ({_one_line(exc)})") from None
    return path


def nonfinite_tensors(named_tensors: Iterable[tuple[str, Any]]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity (float tensors only)."""
    import torch

    bad = []
    for name, tensor in named_tensors:
        if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
    return bad


def check_model_finite(model_dir: str | Path, what: str) -> None:
    """DataError if any weight saved in ``model_dir`` is NaN/inf: a diverged run must not be marked
    complete (later stages would train on it, evaluate it or serve it)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    bad: list[str] = []
    for weights in _weight_files(model_dir):
        if weights.suffix != ".safetensors":
            continue
        with safe_open(str(weights), framework="pt") as handle:
            bad += nonfinite_tensors((key, handle.get_tensor(key)) for key in handle.keys())
    if bad:
        raise DataError(f"{what}: training diverged, {len(bad)} weight tensors hold NaN/inf "
                        f"(first: {bad[0]}); lower the learning rate. Nothing was marked complete.")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
