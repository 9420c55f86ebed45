"""The embedded base model: examples, tokenizer, build + resume on a tiny synthetic run dir."""

from __future__ import annotations

import json
import random

import pytest
import torch

from _llm_helpers import tiny_config, write_tiny_data
from ulrec.config import ConfigError
from ulrec.errors import DataError
from ulrec.resume import finished_marker
from ulrec.model_init import (
    build_base_model,
    make_title_examples,
    make_warm_start_examples,
    read_catalogue_and_histories,
    title_rates,
    train_tokenizer,
)
from ulrec.prompts import PromptBuilder, completion_text, parse_action

TITLES = [f"Item {i} (19{i:02d})" for i in range(10)]


def test_warm_start_examples_follow_the_users_sequence():
    history = [(i, float(1 + i % 5)) for i in range(8)]
    builder = PromptBuilder(history_length=15)
    examples = make_warm_start_examples([history, [(9, 5.0)]], TITLES, builder, 200, 3, random.Random(0))
    assert len(examples) == 200
    shown_steps = set()
    for ex in examples:
        target = parse_action(ex.completion)
        assert ex.completion == completion_text(target)
        t_next = TITLES.index(target)
        lines = ex.prompt.split("(end of example)")[1].split("\n")  # the user's part of the prompt
        steps = [parse_action(l) for l in lines if l.startswith("Action ") and "recommend[" in l]
        history_titles = [l[2:] for l in lines if l.startswith("- ")]
        # history, then the accepted steps, then the target: consecutive items of the sequence.
        sequence = history_titles + steps + [target]
        assert sequence == TITLES[t_next - len(sequence) + 1 : t_next + 1]
        assert history_titles and len(steps) <= 3
        assert ex.prompt.endswith(f"Action {len(steps) + 1}:")
        for k, title in enumerate(steps, start=1):
            rating = history[TITLES.index(title)][1]
            assert f"Observation {k}: The user stayed, reward={rating:.2f}" in lines
        shown_steps.add(len(steps))
    assert shown_steps == {0, 1, 2, 3}


def test_title_examples():
    examples = make_title_examples(TITLES[:3], repeats=2)
    assert [e.completion for e in examples] == [completion_text(t) for t in TITLES[:3]] * 2
    assert all(e.prompt == "Action 1:" for e in examples)


def test_tokenizer_bos_special_tokens_and_prompt_completion_boundary():
    builder = PromptBuilder()
    titles = TITLES + ["Amélie, or [Le] \"Fabuleux\" (2001)", "千と千尋の神隠し"]
    corpus = [builder.build(titles[:4], []) + completion_text(t) for t in titles]
    tok = train_tokenizer(corpus, 400)
    ids = tok("Action 1:")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id is not None and tok.pad_token_id is not None
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    prompt = builder.build(titles[:5], [])
    for title in titles + ["never seen: ☃ ✓"]:  # byte-level: anything encodes and decodes back
        completion = completion_text(title)
        joint = tok(prompt + completion)["input_ids"]
        split = tok(prompt)["input_ids"] + tok(completion, add_special_tokens=False)["input_ids"]
        assert joint == split  # training rows tokenize the same joined or split
        assert tok.decode(joint, skip_special_tokens=True) == prompt + completion


def test_title_rates():
    outs = [" recommend[ Item 1 (1901) ]", "recommend[ item 1 (1901) ]", "nonsense", " recommend[ Item 2 (1902) ]"]
    assert title_rates(outs, TITLES) == {"format_rate": 0.75, "exact_title_rate": 0.5}


def test_missing_data_names_the_file(tmp_path):
    cfg = tiny_config(tmp_path)
    with pytest.raises(DataError, match="items.parquet"):
        build_base_model(cfg)


def test_bad_head_size(tmp_path):
    cfg = tiny_config(tmp_path, hidden_size=72, num_heads=3)  # head size 24: not a vLLM-CPU size
    write_tiny_data(cfg.run_dir / "data")
    with pytest.raises(ConfigError, match="model.num_heads"):
        build_base_model(cfg)


def test_build_base_model_tiny(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = tiny_config(tmp_path)
    titles = write_tiny_data(cfg.run_dir / "data")
    assert read_catalogue_and_histories(cfg.run_dir / "data")[0] == titles
    info = build_base_model(cfg)
    out = cfg.run_dir / "model" / "base"
    assert info["model_dir"] == str(out)
    assert info["warm_start_steps"] > 0 and info["loss_last_mean"] < info["loss_first"]
    assert 0.0 <= info["exact_title_rate"] <= info["format_rate"] <= 1.0
    assert info["eval_prompts"] == cfg.model.warm_start_eval_prompts
    assert info["built_on"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.float32
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert model.config.hidden_size // model.config.num_attention_heads == 32
    assert tok("x")["input_ids"][0] == tok.bos_token_id == model.config.bos_token_id
    assert model.config.eos_token_id == tok.eos_token_id

    # Resume: same inputs skip; a changed model section rebuilds.
    again = build_base_model(cfg)
    assert again["skipped"] is True and again["loss_first"] == info["loss_first"]
    quiet = cfg.model_copy(deep=True)  # regression: run.progress was part of the resume key
    quiet.run.progress = not cfg.run.progress
    assert build_base_model(quiet)["skipped"] is True
    changed = tiny_config(tmp_path, warm_start_examples=32)
    assert finished_marker(out, "x") is None
    rebuilt = build_base_model(changed)
    assert "skipped" not in rebuilt and rebuilt["warm_start_examples"] == 32
