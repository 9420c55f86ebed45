"""One renderer for every place a model reads a transcript: chat templates on, off and auto."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _gguf_helpers import write_tiny_gguf  # noqa: E402
from _train_helpers import SHORT_TEMPLATE, TITLES, byte_level_bpe, kto_rows  # noqa: E402

from ulrec.errors import InputError
from ulrec.prompts import ChatRenderer, PromptBuilder, StepView, completion_text


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """A tiny HF model directory whose tokenizer has a ChatML template (converted from a GGUF)."""
    from ulrec.model_import import convert_gguf

    root = tmp_path_factory.mktemp("chat")
    convert_gguf(write_tiny_gguf(root / "tiny.gguf"), root / "hf")
    return root / "hf"


def transcript() -> str:
    builder = PromptBuilder(SHORT_TEMPLATE, history_length=3)
    return builder.build(TITLES[:3], [StepView(title=TITLES[3], observation="The user stayed, reward=4.00")])


def test_auto_on_off_follow_the_tokenizer(chat_model):
    from transformers import AutoTokenizer

    plain = byte_level_bpe()
    assert not ChatRenderer(plain, "auto").enabled
    with pytest.raises(InputError, match="chat_template=on but the tokenizer of m has no chat template"):
        ChatRenderer(plain, "on", source="m")
    chat = AutoTokenizer.from_pretrained(chat_model)
    assert ChatRenderer(chat, "auto").enabled and not ChatRenderer(chat, "off").enabled
    assert ChatRenderer(chat, "off").render(transcript()) == transcript()


def test_rendering_is_one_user_turn_then_the_open_action(chat_model):
    from transformers import AutoTokenizer

    text = transcript()
    rendered = ChatRenderer(AutoTokenizer.from_pretrained(chat_model), "on").render(text)
    head, _, open_action = text.rpartition("\n")
    assert open_action == "Action 2:"
    assert rendered == f"<|im_start|>user\n{head}<|im_end|>\n<|im_start|>assistant\nAction 2:"


def test_title_mask_finds_the_title_in_chat_rendered_rows(chat_model):
    """The KTO trainer's title mask, from character offsets, on chat-rendered prompts."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.trainers import ULRecKTOConfig, ULRecKTOTrainer

    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    renderer = ChatRenderer(tokenizer, "on")
    rows = [{**r, "prompt": renderer.render(r["prompt"])} for r in kto_rows(6)]
    trainer = ULRecKTOTrainer(
        model=AutoModelForCausalLM.from_pretrained(chat_model),
        ref_model=AutoModelForCausalLM.from_pretrained(chat_model),
        args=ULRecKTOConfig(output_dir="/tmp/unused", per_device_train_batch_size=2, bf16=False, use_cpu=True,
                            report_to="none", disable_tqdm=True),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    for row in trainer.train_dataset:
        assert row["prompt"].startswith("<|im_start|>user\n")
        ids = row["prompt_ids"] + row["completion_ids"]
        title_text = tokenizer.decode([t for t, m in zip(row["completion_ids"], row["title_mask"]) if m])
        completion = row["completion"]
        title = completion[completion.index("[ ") + 2 : completion.rindex(" ]")]
        assert title in title_text  # every title character is covered ...
        # ... and no format token or EOS is
        assert "recommend" not in title_text and tokenizer.eos_token not in title_text
        assert tokenizer.decode(ids).startswith("<|im_start|>user")


def test_policy_backend_renders_before_it_tokenizes(chat_model):
    from ulrec.config import PolicyConfig
    from ulrec.policy.hf import HFPolicy

    on = HFPolicy(PolicyConfig(backend="hf", chat_template="on", temperature=0.0, max_tokens=6), chat_model)
    off = HFPolicy(PolicyConfig(backend="hf", chat_template="off", temperature=0.0, max_tokens=6), chat_model)
    text = transcript()
    rendered = on.renderer.render(text)
    assert rendered != text
    assert on.generate([text], seeds=[0]) == off.generate([rendered], seeds=[0])


def test_training_rows_are_rendered_like_inference(chat_model, tmp_path):
    from train.stages import TrainJob, build_trainer

    rows = tmp_path / "sft.parquet"
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("prompt", "completion")} for r in kto_rows(4)]), rows)
    job = TrainJob(kind="sft", name="sft", rows_path=str(rows), model_path=str(chat_model), learning_rate=1e-3,
                   epochs=1, per_device_batch_size=2, gradient_accumulation_steps=1, warmup_ratio=0.0,
                   max_length=512, logging_steps=1, progress=False)
    trainer = build_trainer(job, str(tmp_path / "out"))
    renderer = ChatRenderer(trainer.processing_class, "auto")
    first = trainer.train_dataset[0]
    expected = trainer.processing_class(renderer.render(kto_rows(4)[0]["prompt"]) + completion_text(
        kto_rows(4)[0]["completion"][len(" recommend[ "):-2]))["input_ids"]
    assert first["input_ids"][: len(expected)] == expected
