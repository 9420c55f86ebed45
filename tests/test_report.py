"""Evaluation summaries and the report, from hand-made episodes (no Ray, no model)."""

import json

import numpy as np
import pandas as pd
import pytest

from ulrec.config import load_config
from ulrec.episodes import episode_row, step_row, write_episodes
from ulrec.evaluation import draw_users, eval_user_pool, item_diversity, summarize_episodes
from ulrec.report import build_report, table_main


def _episodes(method: str, lengths_by_seed: dict[int, list[int]], reason="similar") -> pd.DataFrame:
    rows = []
    for seed, lengths in lengths_by_seed.items():
        for user, length in enumerate(lengths):
            steps = [step_row(k + 1, prompt="p", raw_output="o", item_id=k, title=f"t{k}", substituted=k == 0,
                              reward=4.0, live=True, reason="stay") for k in range(length)]
            steps.append(step_row(length + 1, prompt="p", raw_output="o", item_id=99, title="x",
                                  reward=1.0, live=False, reason=reason))
            rows.append(episode_row(run="r", policy=method, split="test", user_id=user, seed=seed, length=length,
                                    total_reward=4.0 * length, exit_reason=reason, num_generated_tokens=10,
                                    steps=steps))
    return pd.DataFrame(rows)


def test_summary_is_mean_and_sample_std_over_seeds():
    df = _episodes("base", {0: [1, 3], 1: [2, 2], 2: [5, 5]})
    s = summarize_episodes(df)
    # per-seed means 2, 2, 5 → mean 3, sample std sqrt(3)
    assert s["len_mean"] == pytest.approx(3.0)
    assert s["len_std"] == pytest.approx(np.sqrt(3.0))
    assert s["reward_mean"] == pytest.approx(12.0)
    assert s["exit_shares"]["similar"] == 1.0 and s["exit_shares"]["repeat"] == 0.0
    # 6 episodes: 18 accepted steps + 6 exit steps; 5 first steps substituted (lengths ≥ 1)
    g = s["grounding"]
    assert g["steps"] == 24
    assert g["substituted"] == pytest.approx(6 / 24)
    assert g["format_error"] == 0.0
    # items: seeds give lengths 1,3 | 2,2 | 5,5 → item k once per episode longer than k, 99 at every exit
    counts = np.array([6, 5, 3, 2, 2, 6], dtype=float)  # items 0..4 and 99
    p = counts / counts.sum()
    assert s["items"]["distinct"] == 6
    assert s["items"]["entropy"] == pytest.approx(float(-(p * np.log(p)).sum()))
    assert s["items"]["top10_share"] == pytest.approx(1.0)


def test_item_diversity_counts_received_items_only():
    steps = pd.DataFrame({"item_id": [3, 3, 3, 3, -1, 7] + list(range(100, 112))})
    d = item_diversity(steps)
    assert d["distinct"] == 14  # the format error (-1) received nothing
    # the ten most frequent: item 3 (4 of 17 steps) and nine items of one step each
    assert d["top10_share"] == pytest.approx(13 / 17)
    one = item_diversity(pd.DataFrame({"item_id": [5, 5]}))
    assert one == {"distinct": 1, "entropy": 0.0, "top10_share": 1.0}
    assert item_diversity(pd.DataFrame({"item_id": [-1]}))["distinct"] == 0


def test_user_draw_is_fixed_by_seed():
    pool = eval_user_pool({0: [1], 1: [], 2: [3, 4], 3: [5], 7: [1]})
    assert pool == [0, 2, 3, 7]
    assert draw_users(pool, 3, 1) == draw_users(list(reversed(pool)), 3, 1)
    assert len(draw_users(pool, 10, 1)) == 4


def test_report_tables_and_plots(tmp_path):
    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=r"])
    for method, lengths in {"base": [1, 2], "ulrec-p": [4, 6], "ulrec": [8, 9], "dqn": [3, 3]}.items():
        d = cfg.run_dir / "eval" / method
        d.mkdir(parents=True)
        write_episodes(_episodes(method, {0: lengths, 1: lengths, 2: lengths}).to_dict("records"), d / "episodes")
    # a summary written before item diversity was measured: the report takes it from the episodes
    old = summarize_episodes(_episodes("dqn", {0: [3, 3], 1: [3, 3], 2: [3, 3]}))
    del old["items"]
    (cfg.run_dir / "eval" / "dqn" / "summary.json").write_text(json.dumps(old))
    metrics = cfg.run_dir / "checkpoints" / "kto" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("\n".join(json.dumps({"step": i, "loss": 1.0 / (i + 1), "kl": 0.1 * i}) for i in range(5)))
    base = cfg.layout.base_model
    base.mkdir(parents=True)
    (base / "_stage.json").write_text(json.dumps({"built_on": {"cpu": "Some CPU", "torch": "2.13.0",
                                                              "torch_cpu_capability": "AVX2"}}))
    out = build_report(cfg)
    report = (cfg.run_dir / "report.md").read_text()
    assert "Base model built on Some CPU (torch 2.13.0, AVX2 kernels" in report
    assert "| Len ↑ | 3.00 ± 0.00 | 1.50 ± 0.00 | 5.00 ± 0.00 | 8.50 ± 0.00 |" in report
    exits = report[report.index("## Exit reasons"):].splitlines()
    assert next(line for line in exits if line.startswith("| DQN |")).endswith("| 4 | 1.39 | 100% |")
    assert next(line for line in exits if line.startswith("| Base |")).endswith("| 3 | 1.05 | 100% |")
    main = report[report.index("## Main results"):]
    assert main.index("DQN") < main.index("Base") < main.index("ULRec-P")
    for name in ("len_distribution", "exit_reasons", "training_curves"):
        png = cfg.run_dir / out["plots"][name]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((cfg.run_dir / "results.json").read_text())
    assert set(results["results"]) == {"base", "ulrec-p", "ulrec", "dqn"}
    assert table_main({}) == "_no evaluated methods_\n"


def _baseline(len_mean: float, planned: int, curves: dict[str, list[tuple[int, float]]] | None = None) -> dict:
    summary = {"len_mean": len_mean, "len_std": 0.5, "reward_mean": 3 * len_mean, "reward_std": 1.0,
               "budget": {"planned": planned, "done": planned, "unit": "env_steps"}}
    if curves is not None:
        summary["curves"] = {s: [{"done": d, "len_mean": v} for d, v in c] for s, c in curves.items()}
    return summary


def test_converged_comparison_gives_ratios_stopping_points_and_rank_agreement():
    from ulrec.report import converged_comparison

    here = {"a2c": _baseline(5.0, 10_000), "dorl": _baseline(6.0, 10_000), "dqn": _baseline(4.0, 2_000),
            "bcq": _baseline(3.0, 500)}
    converged = {"a2c": _baseline(10.0, 100_000, {"0": [(10, 8.0), (20, 10.0), (30, 9.0)], "1": [(10, 7.0)]}),
                 "dorl": _baseline(12.0, 100_000), "dqn": _baseline(8.0, 100_000), "bcq": _baseline(9.0, 100_000)}
    cmp = converged_comparison(here, converged)
    rows = {r["method"]: r for r in cmp["rows"]}
    assert rows["a2c"]["ratio"] == pytest.approx(0.5) and rows["dqn"]["budget"] == 2_000
    # seed 0 stopped at 30 after its best at 20; seed 1 stopped at its only point
    assert rows["a2c"]["converged_stopped_at"] == [30.0, 10.0] and rows["a2c"]["converged_best_at"] == [20.0, 10.0]
    assert cmp["ranking"] == ["dorl", "a2c", "dqn", "bcq"] and cmp["converged_ranking"] == ["dorl", "a2c", "bcq", "dqn"]
    # of the six pairs only (dqn, bcq) swaps; the three ranked methods keep their order
    assert (cmp["pairs_same_order"], cmp["pairs"]) == (5, 6) and cmp["same_order_ranked"] is True
    swapped = converged_comparison(here, {**converged, "dqn": _baseline(11.0, 100_000)})
    assert swapped["same_order_ranked"] is False


def test_report_compares_the_baselines_with_the_converged_run(tmp_path):
    from ulrec.config import ConfigError

    cfg = load_config(None, [f"run.root={tmp_path}", "run.name=small", "baselines.converged_run=big"])
    for run, lengths in {"small": {"dqn": [3, 3], "a2c": [4, 4]}, "big": {"dqn": [8, 8], "a2c": [6, 6]}}.items():
        for method, ls in lengths.items():
            d = tmp_path / run / "eval" / method
            d.mkdir(parents=True)
            write_episodes(_episodes(method, {0: ls, 1: ls, 2: ls}).to_dict("records"), d / "episodes")
    md = open(build_report(cfg)["report"]).read()
    assert "## RL baselines against their converged run" in md
    assert "A2C, DQN in the same order as converged: **no**" in md  # small: A2C > DQN; big: DQN > A2C
    results = json.loads((cfg.run_dir / "results.json").read_text())
    assert results["converged_baselines"]["run"] == "big"
    # a converged run with nothing in it yet: one line, no comparison
    empty = load_config(None, [f"run.root={tmp_path}", "run.name=small", "baselines.converged_run=none-yet"])
    assert "No converged baselines under" in open(build_report(empty)["report"]).read()
    with pytest.raises(ConfigError):
        load_config(None, ["baselines.converged_run=../elsewhere"])
