"""benchmarks/train_gpu_memory.py runs end to end on a tiny shape (CPU here) and refuses bad input
in one line. The 8B figures it produced on a GPU are in the README (*Memory plan*)."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_gpu_memory.py"


def _tokenizer_dir(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [f"User history: Movie {i} (199{i % 10}). Next: recommend[ Movie {i} (199{i % 10}) ]" for i in range(50)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(path)
    return path


def _rows(path: Path) -> Path:
    rows = [{"prompt": f"User history: Movie {i} (1990). Next:", "completion": f" recommend[ Movie {i + 1} (1991) ]",
             "label": i % 2 == 0} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_tiny_shape_trains_both_modes_and_writes_json_and_markdown(tmp_path):
    out = tmp_path / "mem.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tokenizer", str(_tokenizer_dir(tmp_path / "tok")),
         "--rows", str(_rows(tmp_path / "kto.parquet")), "--shape", "tiny", "--steps", "2", "--modes", "lora,full",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["rows"] == {"rows": 4, "negatives": 2, "mean_prompt_chars": 35}
    lora, full = report["modes"]
    for mode in (lora, full):
        assert mode["steps"] == 2 and mode["finite"], mode
        assert mode["tokens_per_s"] > 0
    # LoRA trains only the adapter; full fine-tuning every parameter of the model.
    assert 0 < lora["trainable_parameters"] < full["trainable_parameters"] == report["model"]["parameters"]
    table = out.with_suffix(".md").read_text()
    assert "| lora |" in table and "| full |" in table


def test_bad_modes_and_missing_paths_are_one_line_errors(tmp_path):
    rows = _rows(tmp_path / "kto.parquet")
    for args, message in (
        (["--tokenizer", str(tmp_path), "--rows", str(rows), "--modes", "lora,qlora"], "--modes must list"),
        (["--tokenizer", str(tmp_path / "nope"), "--rows", str(rows)], "--tokenizer"),
    ):
        proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
