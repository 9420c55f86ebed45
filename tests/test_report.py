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
