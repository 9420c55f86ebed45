"""Hostile input to every subcommand: each case must end in exactly one line on stderr, a non-zero
exit, no traceback anywhere, no Ray session started (checks run before any actor), and no file
outside the run directory changed.

The cases: missing, empty, truncated, wrong-format and non-UTF-8 files; non-finite and ill-typed
settings; run names that try to leave the run root; model directories that hold only a config;
a failing stage that must not delete the outputs of an earlier one.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ulrec.cli import main
from ulrec.feedback import episodes_to_rows

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import TITLES, episode, save_tiny_model  # noqa: E402

SUBCOMMANDS = [
    ["data", "prepare"], ["data", "stats"], ["env", "fit"], ["model", "init"], ["rollout"],
    ["train", "rows"], ["train", "sft"], ["train", "kto"], ["eval"], ["report"], ["run"], ["sweep"],
    ["baselines"], ["serve"],
]
BASE = ["run.name=t", "run.progress=false", "wandb.enabled=false", "ray.num_cpus=2"]


def snapshot(root: Path, run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` outside ``run_dir``, with its size and modification time."""
    out = {}
    for path in root.rglob("*"):
        if path.is_file() and run_dir not in path.parents:
            stat = path.stat()
            out[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns)
    return out


def run_hostile(root: Path, argv: list[str], capfd) -> str:
    """Run one case; assert the contract; return the error line."""
    import ray

    run_dir = root / "runs" / "t"
    before = snapshot(root, run_dir)
    capfd.readouterr()
    code = main(argv)
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, f"{argv}: exit 0\n{out}\n{err}"
    assert "Traceback" not in out + err, f"{argv}: traceback\n{err}"
    assert len(lines) == 1 and lines[0].startswith("ulrec: error: "), f"{argv}: stderr\n{err}"
    assert not ray.is_initialized(), f"{argv}: Ray started before the input was checked"
    assert snapshot(root, run_dir) == before, f"{argv}: changed files outside the run"
    return lines[0]


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    return tmp_path


def overrides(root: Path, *extra: str) -> list[str]:
    return [f"run.root={root / 'runs'}", *BASE, *extra]


# ------------------------------------------------------------------ bad configs, every subcommand
def _write(name: str, data: bytes) -> Callable[[Path], list[str]]:
    def make(root: Path) -> list[str]:
        (root / name).write_bytes(data)
        return ["--config", str(root / name)]
    return make


CONFIG_CASES: dict[str, Callable[[Path], list[str]]] = {
    "missing file": lambda root: ["--config", str(root / "nope.yaml")],
    "a directory": lambda root: ["--config", str(root)],
    "not UTF-8": _write("latin1.yaml", "run:\n  name: caf\xe9\n".encode("latin-1")),
    "binary": _write("binary.yaml", bytes(range(256)) * 4),
    "invalid YAML": _write("bad.yaml", b"run: [\n"),
    "top level list": _write("list.yaml", b"- 1\n- 2\n"),
    "unknown section": _write("unknown.yaml", b"nosuch:\n  key: 1\n"),
    "unknown key": lambda root: ["sft.no_such_key=1"],
    "override without =": lambda root: ["sft.learning_rate"],
    "empty override key": lambda root: ["=3"],
    "infinite lr": lambda root: ["sft.learning_rate=inf"],
    "overflowing beta": lambda root: ["kto.beta=1e400"],
    "NaN alpha": lambda root: ["kto.alpha=nan"],
    "YAML infinity": lambda root: ["env.reward_threshold=.inf"],
    "infinite serve temperature": lambda root: ["serve.max_temperature=inf"],
    "infinity in a list": lambda root: ["pipeline.sweep_betas=[0.01,.inf]"],
    "wrong type": lambda root: ["rollout.num_users=many"],
    "out of range": lambda root: ["eval.num_users=-3"],
    "traversal": lambda root: ["run.name=../../escape"],
    "absolute run name": lambda root: [f"run.name={root / 'elsewhere'}"],
    "hidden run name": lambda root: ["run.name=.."],
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_every_subcommand_rejects_bad_config_in_one_line(root, capfd, case):
    for sub in SUBCOMMANDS:
        bad = CONFIG_CASES[case](root)
        # A case is either `--config FILE` or dotted overrides.
        config_args, dotted = (bad, []) if bad[0] == "--config" else ([], bad)
        line = run_hostile(root, [*sub, *config_args, *overrides(root), *dotted], capfd)
        assert "config" in line or "override" in line, line
    assert not (root.parent / "escape").exists() and not (root / "elsewhere").exists()


# ------------------------------------------------------------------- bad inputs inside a run dir
def make_run(root: Path) -> Path:
    """A run directory holding rows, a tiny base model and a finished SFT checkpoint."""
    from ulrec.config import load_config

    cfg = load_config(None, overrides(root))
    episodes = [episode(u, TITLES[: 2 + u % 3], ["repeat", "similar", None][u % 3]) for u in range(9)]
    table = pa.Table.from_pylist(episodes_to_rows(episodes, cfg.feedback))
    rows = cfg.run_dir / "rows"
    rows.mkdir(parents=True)
    pq.write_table(table, rows / "kto.parquet")
    pq.write_table(table.filter(table.column("label")), rows / "sft.parquet")
    save_tiny_model(cfg.run_dir / "model" / "base")
    shutil.copytree(cfg.run_dir / "model" / "base", cfg.run_dir / "checkpoints" / "sft")
    return cfg.run_dir


SYNTHETIC = ["data.dataset=synthetic", "data.synthetic_users=40", "data.synthetic_items=30"]


@pytest.fixture(scope="module")
def template_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("template"))


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory) -> Path:
    """The template plus prepared (synthetic) data, but no simulators."""
    root = tmp_path_factory.mktemp("prepared")
    run_dir = make_run(root)
    assert main(["data", "prepare", *overrides(root), *SYNTHETIC]) == 0
    return run_dir


def config_only_dir(root: Path) -> Path:
    path = root / "config_only"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    return path


def truncate(path: Path, size: int = 100) -> None:
    with path.open("r+b") as fh:
        fh.truncate(size)


INPUT_CASES: dict[str, tuple[list[str], Callable[[Path, Path], list[str]], str]] = {
    # name: (subcommand, setup(root, run_dir) -> extra args, expected fragment of the line)
    "sft on an empty model dir": (["train", "sft"], lambda r, d: [f"policy.model={(r / 'empty').mkdir() or r / 'empty'}"], "no config.json"),
    "sft on a config-only model dir": (["train", "sft"], lambda r, d: [f"policy.model={config_only_dir(r)}"], "no tokenizer"),
    "rollout on a config-only model dir": (["rollout"], lambda r, d: [f"policy.model={config_only_dir(r)}", "rollout.num_users=4"], "no tokenizer"),
    "rollout on a missing model dir": (["rollout"], lambda r, d: [f"policy.model={r / 'absent'}"], "absent"),
    "serve a config-only checkpoint": (["serve"], lambda r, d: ["--checkpoint", str(config_only_dir(r))], "no tokenizer"),
    "serve a missing checkpoint": (["serve"], lambda r, d: ["--checkpoint", str(r / "absent")], "does not exist"),
    "serve with no checkpoint yet": (["serve"], lambda r, d: [], "checkpoints/kto"),
    "sft on truncated weights": (["train", "sft"], lambda r, d: truncate(d / "model" / "base" / "model.safetensors") or [], "model.safetensors"),
    "sft on a broken config.json": (["train", "sft"], lambda r, d: (d / "model" / "base" / "config.json").write_text("{oops") and [], "config.json"),
    "kto on truncated rows": (["train", "kto"], lambda r, d: truncate(d / "rows" / "kto.parquet") or [], "kto.parquet"),
    "sft on empty rows": (["train", "sft"], lambda r, d: truncate(d / "rows" / "sft.parquet", 0) or [], "sft.parquet"),
    "kto on a config-only SFT checkpoint": (
        ["train", "kto"], lambda r, d: [shutil.rmtree(d / "checkpoints" / "sft"), config_only_dir(d / "checkpoints").rename(d / "checkpoints" / "sft")] and [], "no tokenizer"),
    "rows without rollouts": (["train", "rows"], lambda r, d: [], "rollouts"),
    "rollout without data": (["rollout"], lambda r, d: ["rollout.num_users=4"], "data prepare"),
    "eval without data": (["eval"], lambda r, d: [], "data prepare"),
    "sweep without data": (["sweep"], lambda r, d: [], "data prepare"),
    "stats without data": (["data", "stats"], lambda r, d: [], "data"),
    "fit on garbage data": (
        ["env", "fit"],
        lambda r, d: [(d / "data").mkdir(), (d / "data" / "items.parquet").write_bytes(b"garbage"),
                      (d / "data" / "train.parquet").write_bytes(b"garbage"), (d / "data" / "test.parquet").write_bytes(b"garbage")] and [],
        "Parquet"),
    "steam file that is not JSON": (
        ["data", "prepare"], lambda r, d: (r / "steam.json").write_bytes(b"\x00\xff not json") and
        ["data.dataset=steam", f"data.path={r / 'steam.json'}"], "steam"),
    "missing dataset path": (["data", "prepare"], lambda r, d: ["data.dataset=steam", f"data.path={r / 'absent.json'}"], "absent.json"),
    "gguf that is not one": (
        ["model", "init"], lambda r, d: (r / "x.gguf").write_bytes(b"GGUF" + b"\x00" * 60) and
        ["model.source=gguf", f"model.path={r / 'x.gguf'}"], "x.gguf"),
    "hf source on an empty dir": (["model", "init"], lambda r, d: (r / "hf").mkdir() or ["model.source=hf", f"model.path={r / 'hf'}"], "no config.json"),
    "report without results": (["report"], lambda r, d: [], "ulrec eval"),
}


@pytest.mark.parametrize("case", sorted(INPUT_CASES))
def test_bad_inputs_end_in_one_line(root, capfd, template_run, case):
    run_dir = root / "runs" / "t"
    shutil.copytree(template_run, run_dir)
    sub, setup, fragment = INPUT_CASES[case]
    extra = setup(root, run_dir)
    # `serve --checkpoint DIR` goes before the overrides.
    flags, dotted = (extra[:2], extra[2:]) if extra[:1] == ["--checkpoint"] else ([], extra)
    line = run_hostile(root, [*sub, *flags, *overrides(root), *dotted], capfd)
    assert fragment in line, line


PREPARED_CASES: dict[str, tuple[list[str], list[str], str]] = {
    "rollout without simulators": (["rollout"], ["rollout.num_users=4"], "env fit"),
    "eval without simulators": (["eval"], [], "env fit"),
    "sweep without simulators": (["sweep"], ["rollout.num_users=10"], "env fit"),
    "baselines without simulators": (["baselines"], ["baselines.enabled=true"], "env fit"),
}


@pytest.mark.parametrize("case", sorted(PREPARED_CASES))
def test_missing_stage_inputs_end_in_one_line(root, capfd, prepared_run, case):
    shutil.copytree(prepared_run, root / "runs" / "t")
    sub, extra, fragment = PREPARED_CASES[case]
    line = run_hostile(root, [*sub, *overrides(root), *SYNTHETIC, *extra], capfd)
    assert fragment in line, line


def test_failing_fit_keeps_the_earlier_metrics(root, capfd):
    """A stage that fails never deletes what it did not produce in this attempt."""
    run_dir = root / "runs" / "t"
    sims = run_dir / "simulators"
    sims.mkdir(parents=True)
    (sims / "metrics.jsonl").write_text('{"train/distance_threshold": 0.1}\n')
    (run_dir / "data").mkdir()
    for name in ("items", "train", "test"):
        (run_dir / "data" / f"{name}.parquet").write_bytes(b"garbage")
    run_hostile(root, ["env", "fit", *overrides(root)], capfd)
    assert (sims / "metrics.jsonl").read_text() == '{"train/distance_threshold": 0.1}\n'
    assert [p.name for p in sims.iterdir()] == ["metrics.jsonl"]


def test_unexpected_failure_is_one_line_with_the_traceback_in_a_log(root, capfd, monkeypatch):
    """A bug (not bad input) still reaches the user as one line; the traceback goes to a log file."""
    import ulrec.data

    def broken(cfg):
        raise KeyError("internal")

    monkeypatch.setattr(ulrec.data, "load_stats", broken)
    line = run_hostile(root, ["data", "stats", *overrides(root)], capfd)
    log = Path(line.rsplit("traceback in ", 1)[1].rstrip(")"))
    assert line.startswith("ulrec: error: KeyError") and log.is_file()
    assert "Traceback" in log.read_text() and log.parent == root / "runs" / "t" / "logs"
