"""Whether a running engine can switch to another model directory's weights in place.

Engines that live across stages (``rollout.keep_engines``) serve every method's evaluation by
loading each checkpoint's weights into the engine they already have, instead of starting a new
one. That is only the same as a fresh engine when nothing but the weights differs: the same
architecture (config.json), the same tokenizer and chat template, the same generation config.
Pure file comparisons; no engine is imported here.
"""

from __future__ import annotations

import json
from pathlib import Path

# Keys that name where a file came from or how it was last saved, not what the model computes.
_IGNORED_KEYS = {
    "config.json": {"_name_or_path", "transformers_version", "use_cache"},
    "generation_config.json": {"transformers_version"},
    "tokenizer_config.json": {"is_local", "local_files_only", "name_or_path", "tokenizer_file"},
}
# Compared byte for byte where either directory has them.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json")


def _json(path: Path, ignored: set[str]) -> dict | None:
    if not path.is_file():
        return None
    return {k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if k not in ignored}


def swap_blocker(current: str | Path, new: str | Path) -> str | None:
    """Why ``new``'s weights cannot replace ``current``'s in a running engine; None when they can."""
    current, new = Path(current), Path(new)
    if (new / "adapter_config.json").is_file():
        return f"{new} is a LoRA adapter, not a full model directory"
    if not (new / "config.json").is_file():
        return f"{new} has no config.json"
    for name, ignored in _IGNORED_KEYS.items():
        if _json(current / name, ignored) != _json(new / name, ignored):
            return f"{name} differs"
    for name in _TOKENIZER_FILES:
        a, b = current / name, new / name
        if a.is_file() != b.is_file() or (a.is_file() and a.read_bytes() != b.read_bytes()):
            return f"{name} differs"
    return None
