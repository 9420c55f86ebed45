"""Every stage of one pipeline run lands in one W&B group: the stage loggers (data, rollouts,
evaluation, baselines) and the Ray Train stages' environment (SFT, KTO)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

from train.stages import _wandb_env
from ulrec.config import load_config
from ulrec.tracking import read_metrics, stage_logger, wandb_mode


class FakeRun:
    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        self.logged: list[dict] = []
        self.summary: dict = {}

    def log(self, metrics, step=None) -> None:
        self.logged.append(metrics)

    def finish(self) -> None:
        pass


def test_every_stage_of_a_run_shares_one_wandb_group(tmp_path, monkeypatch):
    runs: list[FakeRun] = []
    fake = types.SimpleNamespace(init=lambda **kw: runs.append(FakeRun(**kw)) or runs[-1])
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=exp1"])
    assert wandb_mode(cfg) == "offline"  # no key: offline, never a login prompt

    for stage in ("rollout-train", "eval", "baselines"):
        with stage_logger(cfg, stage, tmp_path / stage) as logger:
            logger.log({"x": 1.0})
    assert [r.kwargs["group"] for r in runs] == ["exp1"] * 3
    assert [r.kwargs["name"] for r in runs] == ["exp1/rollout-train", "exp1/eval", "exp1/baselines"]
    assert {r.kwargs["mode"] for r in runs} == {"offline"}
    assert read_metrics(tmp_path / "eval" / "metrics.jsonl")[0]["x"] == 1.0

    for stage in ("sft", "kto"):
        env = _wandb_env(cfg, stage)
        assert (env["WANDB_RUN_GROUP"], env["WANDB_NAME"], env["WANDB_MODE"]) == ("exp1", f"exp1/{stage}", "offline")

    grouped = load_config(None, [f"run.root={tmp_path}", "run.name=exp1", "wandb.group=sweep-a"])
    assert _wandb_env(grouped, "kto")["WANDB_RUN_GROUP"] == "sweep-a"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode(cfg) == "online"
    assert _wandb_env(load_config(None, ["wandb.enabled=false"]), "sft") is None
    json.dumps([r.kwargs["config"] for r in runs])  # the config travels as plain JSON


def test_report_sends_summaries_results_table_and_plots_to_the_runs_group(tmp_path, monkeypatch):
    from test_report import _episodes

    from ulrec.episodes import write_episodes
    from ulrec.report import RESULT_COLUMNS, build_report

    runs: list[FakeRun] = []

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    class Image:
        def __init__(self, path):
            self.path = path

    fake = types.SimpleNamespace(init=lambda **kw: runs.append(FakeRun(**kw)) or runs[-1], Table=Table, Image=Image)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=exp2"])
    for method, lengths in (("base", [1, 2]), ("ulrec", [4, 6])):
        episodes = _episodes(method, {0: lengths, 1: lengths, 2: lengths})
        write_episodes(episodes.to_dict("records"), cfg.layout.eval_episodes(method))
        summary = __import__("ulrec.evaluation", fromlist=["x"]).summarize_episodes(episodes)
        (cfg.layout.eval_method(method) / "summary.json").write_text(json.dumps({**summary, "method": method}))
    build_report(cfg)

    (run,) = runs
    assert run.kwargs["group"] == "exp2" and run.kwargs["name"] == "exp2/report"
    assert run.summary["ulrec/len_mean"] == 5.0 and run.summary["base/len_mean"] == 1.5
    (table,) = [m["results"] for m in run.logged if "results" in m]
    assert table.columns == RESULT_COLUMNS and [row[0] for row in table.data] == ["base", "ulrec"]
    images = {k: v.path for m in run.logged for k, v in m.items() if k.startswith("plots/")}
    assert "plots/exit_reasons" in images and all(Path(p).is_file() for p in images.values())
