"""The one stage runner (``ulrec.resume.run_stage``): skip, build, mark — in that order."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ulrec.config import load_config
from ulrec.resume import StageInputs, finished_marker, resume_key, run_stage

STAGE = StageInputs("toy", ("env",), lambda cfg, source: {"source": source})


def _toy(cfg, out: Path, source: Path, builds: list, fail: bool = False):
    def build(key):
        builds.append(key)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.txt").write_text(source.read_text().upper())
        if fail:
            raise RuntimeError("interrupted")
        return {"result": (out / "result.txt").read_text()}, {"chars": len(source.read_text())}

    return run_stage(STAGE, cfg, out, build, skipped=lambda marker: {"skipped": True, **marker},
                     required=("result.txt",), source=source)


def test_runner_skips_same_inputs_and_rebuilds_when_an_input_or_output_changed(tmp_path):
    cfg = load_config(None, [f"run.root={tmp_path}"])
    source, out, builds = tmp_path / "in.txt", tmp_path / "out", []
    source.write_text("abc")
    assert _toy(cfg, out, source, builds) == {"result": "ABC"}
    marker = json.loads((out / "_stage.json").read_text())
    assert marker == {"hash": resume_key(STAGE, cfg, source=source), "stage": "toy", "chars": 3}
    again = _toy(cfg, out, source, builds)
    assert again["skipped"] is True and again["chars"] == 3 and len(builds) == 1
    source.write_text("abcd")  # the artifact's content, same path
    assert _toy(cfg, out, source, builds) == {"result": "ABCD"} and len(builds) == 2
    changed = load_config(None, [f"run.root={tmp_path}", "env.max_steps=7"])  # a declared section
    assert "skipped" not in _toy(changed, out, source, builds) and len(builds) == 3
    (out / "result.txt").unlink()  # a required output went missing
    assert "skipped" not in _toy(changed, out, source, builds) and len(builds) == 4


def test_an_interrupted_build_is_never_taken_for_a_finished_one(tmp_path):
    cfg = load_config(None, [f"run.root={tmp_path}"])
    source, out, builds = tmp_path / "in.txt", tmp_path / "out", []
    source.write_text("abc")
    _toy(cfg, out, source, builds)
    old_key = json.loads((out / "_stage.json").read_text())["hash"]
    source.write_text("xyz")
    with pytest.raises(RuntimeError, match="interrupted"):
        _toy(cfg, out, source, builds, fail=True)
    # The build rewrote result.txt in place before failing: the old marker must be gone, or going
    # back to the old input would skip over half-new outputs.
    assert not (out / "_stage.json").exists()
    source.write_text("abc")
    assert finished_marker(out, old_key, ("result.txt",)) is None
    assert _toy(cfg, out, source, builds) == {"result": "ABC"} and len(builds) == 3


def test_no_stage_keys_or_marks_its_outputs_by_hand():
    """Every stage goes through the runner: keys and markers are made only in ulrec/resume.py."""
    root = Path(__file__).resolve().parents[1]
    by_hand = re.compile(r"\b(stage_done|mark_stage_done|resume_key|mark_done|finished_marker)\(")
    found = [p.relative_to(root).as_posix() for layer in ("ulrec", "rollout", "train", "serve")
             for p in (root / layer).rglob("*.py")
             if p.relative_to(root).as_posix() != "ulrec/resume.py" and by_hand.search(p.read_text())]
    assert found == []
