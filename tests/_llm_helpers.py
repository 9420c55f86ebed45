"""Shared fixtures for the prompt/grounding/policy/model-init tests: a tiny synthetic run dir."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd

from ulrec.config import Config

# Awkward on purpose: brackets, quotes, commas, unicode, "]" inside titles.
AWKWARD_TITLES = [
    "Heat (1995)",
    "[REC] (2007)",
    "Amélie, or Le Fabuleux Destin d'Amélie Poulain (2001)",
    'The "Burbs" (1989)',
    "Crouching Tiger, Hidden Dragon [Wo hu cang long] (2000)",
    "Léon: The Professional (1994)",
    "千と千尋の神隠し (2001)",
    "Se7en ]",
]


def tiny_titles(n: int) -> list[str]:
    words = ["Star", "Dark", "River", "Night", "Garden", "Iron", "Blue", "Silent", "Lost", "City"]
    rng = random.Random(7)
    titles = list(AWKWARD_TITLES)
    while len(titles) < n:
        t = f"{rng.choice(words)} {rng.choice(words)} ({1950 + len(titles)})"
        titles.append(t)
    return titles[:n]


def write_tiny_data(data_dir: Path, n_items: int = 24, n_users: int = 30, per_user: int = 12, seed: int = 0) -> list[str]:
    """items.parquet + train.parquet per the run-dir contract; returns the titles."""
    rng = np.random.default_rng(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    titles = tiny_titles(n_items)
    pd.DataFrame({"item_id": np.arange(n_items, dtype=np.int64), "title": titles}).to_parquet(data_dir / "items.parquet")
    rows = []
    for u in range(n_users):
        items = rng.permutation(n_items)[:per_user]
        for k, i in enumerate(items):
            rows.append((u, int(i), float(rng.integers(1, 6)), 1000 * u + k))
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"]).astype(
        {"user_id": "int64", "item_id": "int64", "rating": "float32", "timestamp": "int64"}
    )
    df.to_parquet(data_dir / "train.parquet")
    return titles


def tiny_config(root: Path, **model_overrides) -> Config:
    """A config whose model init takes seconds: 2 heads of 32 (a vLLM-CPU head size)."""
    model = dict(
        hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128, max_position_embeddings=1024,
        vocab_size=600, warm_start_examples=64, warm_start_epochs=1, warm_start_batch_size=16,
        warm_start_eval_prompts=8, warm_start_title_repeats=3, warm_start_max_steps=2,
    )
    model.update(model_overrides)
    return Config.model_validate({"run": {"root": str(root), "name": "tiny", "progress": False}, "model": model})


def perturbed_copy(model_dir, out_dir, scale: float = 0.3) -> None:
    """The same architecture and tokenizer with other weights (each tensor plus seeded noise)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out_dir)
    weights = load_file(str(out_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    noisy = {k: v + scale * v.std() * torch.randn(v.shape, generator=gen) if v.numel() > 1 else v
             for k, v in weights.items()}
    save_file(noisy, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "_stage.json").unlink(missing_ok=True)  # identified by content, not the base's marker
