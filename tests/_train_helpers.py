"""Tiny models, tokenizers, episodes and rows for the training tests (built locally, no downloads)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from ulrec.prompts import PromptBuilder, StepView, completion_text, format_action

TITLES = [
    "Heat (1995)",
    "Fargo (1996)",
    "Amélie (2001)",
    "Se7en [Director's Cut] (1995)",
    "東京物語 (1953)",
    "The Matrix (1999)",
    "Alien [1979]",
    "Casablanca (1942)",
]
SHORT_TEMPLATE = "Recommend one item per turn as recommend[ title ].\nHistory:\n{history}\n"


def corpus(n_lines: int = 200) -> list[str]:
    rng = random.Random(0)
    lines = []
    for _ in range(n_lines):
        k = rng.randint(1, 4)
        lines.append(f"Action {k}: {format_action(rng.choice(TITLES))}\nObservation {k}: The user stayed, reward=4.00")
    return lines + [SHORT_TEMPLATE] * 20 + [f"- {t}" for t in TITLES] * 5


def byte_level_bpe(vocab_size: int = 400):
    """A byte-level BPE without pre-split regex, so `[` merges with its neighbours."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def wordpiece():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[PAD]", "[EOS]"])
    tok.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[EOS]", pad_token="[PAD]", unk_token="[UNK]")


def unigram_metaspace():
    """A sentencepiece-style Unigram with a Metaspace pre-tokenizer (spaces become `▁`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>", "<pad>", "</s>"], unk_token="<unk>")
    tok.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def tiny_llama(tokenizer, seed: int = 0, hidden: int = 64, layers: int = 1):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def save_tiny_model(path: Path, seed: int = 0) -> Path:
    tokenizer = byte_level_bpe()
    model = tiny_llama(tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def episode(user_id: int, titles: list[str], exit_reason: str | None, raw_exit: str = "", seed: int = 0) -> dict:
    """An episode as the rollout writes it: accepted steps for ``titles[:-1]`` and, with an
    ``exit_reason``, a last step that made the user leave (else every step is live)."""
    builder = PromptBuilder(SHORT_TEMPLATE, history_length=3)
    history = TITLES[:3]
    views: list[StepView] = []
    steps: list[dict[str, Any]] = []
    for k, title in enumerate(titles, start=1):
        is_exit = exit_reason is not None and k == len(titles)
        fmt_error = is_exit and exit_reason == "format_error"
        raw = raw_exit if fmt_error else completion_text(title)
        reason = exit_reason if is_exit else ("horizon" if k == len(titles) else "stay")
        steps.append(
            {
                "step": k,
                "prompt": builder.build(history, views),
                "raw_output": raw,
                "item_id": -1 if fmt_error else TITLES.index(title),
                "title": "" if fmt_error else title,
                "substituted": False,
                "reward": 0.0 if fmt_error else 4.0,
                "live": not is_exit,
                "reason": reason,
            }
        )
        views.append(StepView(None if fmt_error else title, "The user stayed, reward=4.00", raw_output=raw))
    live = [s for s in steps if s["live"]]
    return {
        "run": "t",
        "policy": "base",
        "split": "train",
        "user_id": user_id,
        "seed": seed,
        "length": len(live),
        "total_reward": float(sum(s["reward"] for s in live)),
        "exit_reason": exit_reason or "horizon",
        "steps": steps,
    }


def kto_rows(n: int = 16) -> list[dict[str, Any]]:
    """Alternating positive/negative prompt-completion rows."""
    builder = PromptBuilder(SHORT_TEMPLATE, history_length=3)
    rng = random.Random(1)
    rows = []
    for i in range(n):
        history = rng.sample(TITLES, 3)
        title = rng.choice([t for t in TITLES if t not in history])
        rows.append({"prompt": builder.build(history, []), "completion": completion_text(title), "label": i % 2 == 0})
    return rows
