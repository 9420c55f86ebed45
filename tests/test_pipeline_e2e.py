"""`ulrec run` end to end on the tiniest settings: every stage through the CLI, the report's
structure, and a rerun that skips every finished stage."""

from __future__ import annotations

import json
import re

import pytest
import ray

from ulrec.cli import main

TINY_RUN = [
    "run.name=e2e",
    "run.progress=false",
    "wandb.enabled=false",
    "ray.num_cpus=2",
    "data.dataset=synthetic",
    "data.synthetic_users=80",
    "data.synthetic_items=40",
    "data.synthetic_interactions_per_user=16",
    "simulator.deepfm.epochs=2",
    "env.calibration_users=50",
    # Lenient users, so the tiny model's episodes have accepted steps to learn from.
    "env.reward_threshold=0.5",
    "env.distance_threshold=0.0",
    # One layer, two heads of 32 (a head size vLLM's CPU attention supports).
    "model.hidden_size=64",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.intermediate_size=128",
    "model.max_position_embeddings=1024",
    "model.vocab_size=600",
    "model.warm_start_examples=64",
    "model.warm_start_epochs=1",
    "model.warm_start_batch_size=16",
    "model.warm_start_eval_prompts=4",
    "model.warm_start_title_repeats=2",
    # The tiny model has not learnt the output format: decode catalogue titles only.
    "policy.constrained=true",
    "policy.max_tokens=24",
    "policy.max_num_seqs=64",
    "rollout.num_users=30",
    "rollout.max_steps=5",
    "rollout.lane_size=32",
    "rollout.max_batch_size=64",
    "sft.epochs=1",
    "sft.per_device_batch_size=8",
    "sft.learning_rate=1e-3",
    "sft.logging_steps=1",
    "kto.epochs=1",
    "kto.per_device_batch_size=8",
    "kto.learning_rate=1e-3",
    "kto.logging_steps=1",
    "eval.num_users=10",
    "eval.seeds=[0,1]",
    "eval.max_steps=6",
    "eval.methods=[base,ulrec-p,ulrec,billp]",
    "billp.candidates=2",
]

STAGE_OUTPUTS = [
    "data/items.parquet",
    "simulators/train",
    "simulators/test",
    "model/base/config.json",
    "rollouts/train/_stage.json",
    "rows/sft.parquet",
    "rows/kto.parquet",
    "checkpoints/sft/config.json",
    "checkpoints/kto/config.json",
    "checkpoints/kto/metrics.jsonl",
    "eval/base/summary.json",
    "eval/ulrec-p/summary.json",
    "eval/ulrec/summary.json",
    "eval/billp/summary.json",
    "eval/billp/memory.json",
    "report.md",
    "results.json",
    "plots/len_distribution.png",
    "plots/exit_reasons.png",
    "plots/training_curves.png",
    "timings.json",
]


def rollout_episodes(run_dir) -> int:
    import pyarrow.parquet as pq

    return pq.read_table(run_dir / "rollouts/train", columns=["user_id"]).num_rows


@pytest.fixture
def own_ray_session():
    """`ulrec run` starts Ray in this process (a CLI process ends with it); later tests start
    their own, so it must be down when this test ends."""
    yield
    ray.shutdown()


# Stage 2's β chosen by `ulrec sweep` on validation users of the train simulator.
SWEEP = ["pipeline.use_sweep_pick=true", "pipeline.sweep_betas=[0.01,0.5]", "pipeline.sweep_alphas=[0.1]",
         "pipeline.sweep_sft_learning_rates=[1e-5,1e-3]",
         "pipeline.sweep_validation_users=8"]
# A second round (beyond the paper): rollouts with round 1's ULRec policy, rows of both rounds, KTO again.
ROUNDS = ["pipeline.rounds=2"]
# Stage 2 also learns from the stage-1 model's own exits at the evaluation temperature.
ON_POLICY = ["kto.on_policy.enabled=true"]


@pytest.mark.slow
def test_run_chains_every_stage_then_skips_them_on_rerun(tmp_path, capsys, own_ray_session):
    import pyarrow.parquet as pq

    args = ["run", *TINY_RUN, *SWEEP, *ROUNDS, *ON_POLICY, f"run.root={tmp_path}"]
    assert main(args) == 0
    first = capsys.readouterr().out
    run_dir = tmp_path / "e2e"
    for rel in STAGE_OUTPUTS:
        assert (run_dir / rel).exists(), rel
    # A quiet terminal: headers, one line per stage, the table; library output went to the log.
    assert len(first.splitlines()) <= 80, len(first.splitlines())
    assert "PlacementGroupCleaner" not in first and "wandb:" not in first and "INFO" not in first
    assert "   done in " in first and (run_dir / "logs/ulrec.log").is_file()

    # The sweep: every cell scored on held-out train users, on the train simulator, never on test.
    sweep = json.loads((run_dir / "sweep/results.json").read_text())
    assert [c["beta"] for c in sweep["cells"]] == [0.01, 0.5] and (run_dir / "sweep/heatmap.png").is_file()
    assert sweep["pick"] == max(sweep["cells"], key=lambda c: (c["len_mean"], c["reward_mean"]))
    rollout_users = set(pq.read_table(run_dir / "rollouts/train", columns=["user_id"]).column(0).to_pylist())
    for cell in sweep["cells"]:
        episodes = pq.read_table(run_dir / "sweep/eval" / cell["name"] / "episodes", columns=["user_id", "split"])
        assert set(episodes.column("split").to_pylist()) == {"train"}
        assert not set(episodes.column("user_id").to_pylist()) & rollout_users
        assert len(set(episodes.column("user_id").to_pylist())) == 8
    assert f"pick: beta {sweep['pick']['beta']:g}" in first
    # Stage 1 searched first (scored as ULRec-P on the same users); its pick became checkpoints/sft.
    assert [c["learning_rate"] for c in sweep["sft_cells"]] == [1e-5, 1e-3]
    assert sweep["sft_pick"] == max(sweep["sft_cells"], key=lambda c: (c["len_mean"], c["reward_mean"]))
    assert f"SFT pick: learning_rate {sweep['sft_pick']['learning_rate']:g}" in first
    assert "== SFT (ULRec-P)\n   skipped" in first
    assert (run_dir / "checkpoints/sft/_stage.json").read_text() == \
        (run_dir / "checkpoints" / sweep["sft_pick"]["name"] / "_stage.json").read_text()
    assert "## SFT sweep" in (run_dir / "report.md").read_text()
    # stage 2 is the pick's checkpoint (adopted, not trained again)
    assert "== KTO (ULRec)\n   skipped" in first
    assert f"β {sweep['pick']['beta']:g}" in (run_dir / "report.md").read_text()

    # kto.on_policy: the stage-1 pick played the training users on the train simulator at the
    # evaluation temperature, once (the sweep's cell and the adopted checkpoint share the rollout),
    # and stage 2 trained on the collector's rows plus its negatives.
    [own_dir] = (run_dir / "rollouts").glob("onpolicy-*")
    own = pq.read_table(own_dir, columns=["user_id", "split"])
    assert set(own.column("user_id").to_pylist()) == rollout_users and set(own.column("split").to_pylist()) == {"train"}
    on_policy = json.loads((run_dir / "rows_onpolicy/sft/stats.json").read_text())
    assert on_policy["temperature"] == 0.5 and on_policy["keep"] == "negatives"
    stage2_rows = pq.read_table(run_dir / "rows_onpolicy/sft/kto.parquet")
    assert stage2_rows.num_rows == pq.read_table(run_dir / "rows/kto.parquet").num_rows + on_policy["on_policy_negatives"]
    assert "## Stage 2's on-policy rows" in (run_dir / "report.md").read_text()

    # Round 2: collected by round 1's ULRec policy, trained from it, evaluated like the others.
    rounds = json.loads((run_dir / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2] and all(0 <= r["len_mean"] <= 6 for r in rounds)
    round2 = pq.read_table(run_dir / "rollouts/train_round2", columns=["policy"]).column(0).to_pylist()
    assert set(round2) == {"kto"}  # round 1's ULRec checkpoint collected them
    assert (run_dir / "checkpoints/kto_round2/config.json").is_file()
    assert "## Iterative rounds" in (run_dir / "report.md").read_text()

    # The table is printed and the report carries the paper's Table 1 shape.
    cell = r"[0-9.]+ ± [0-9.]+"
    table_rows = [r"^\| +\| BiLLP \| Base \| ULRec-P \| ULRec \|$",
                  rf"^\| Len ↑ \| {cell} \| {cell} \| {cell} \| {cell} \|$",
                  rf"^\| Traj Reward ↑ \| {cell} \| {cell} \| {cell} \| {cell} \|$"]
    report = (run_dir / "report.md").read_text()
    for pattern in table_rows:
        assert re.search(pattern, first, re.M) and re.search(pattern, report, re.M), pattern
    for heading in ("## Main results (paper Table 1)", "## Exit reasons and grounding", "## Plots"):
        assert heading in report
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["results"]) == {"base", "ulrec-p", "ulrec", "billp"}
    # BiLLP: the base model planning with a memory of the training rollouts.
    billp = results["results"]["billp"]
    assert billp["billp"]["candidates"] == 2 and billp["billp"]["episodes"] > 0
    assert "- BiLLP (base model, no training): 2 retrieved reflections" in report
    memory = json.loads((run_dir / "eval/billp/memory.json").read_text())
    assert len(memory["reflections"]) == billp["billp"]["episodes"] == rollout_episodes(run_dir)
    for summary in results["results"].values():
        assert summary["episodes"] == 10 * 2
        assert 0 <= summary["len_mean"] <= 6
    kto_metrics = [json.loads(line) for line in (run_dir / "checkpoints/kto/metrics.jsonl").read_text().splitlines()]
    assert any("rewards/chosen" in m and "kl" in m for m in kto_metrics)

    # A rerun with the same config skips every stage: no output is rewritten.
    rewritten_each_run = ("report.md", "results.json", "timings.json", "plots/")
    mtimes = {
        rel: (run_dir / rel).stat().st_mtime_ns for rel in STAGE_OUTPUTS if not rel.startswith(rewritten_each_run)
    }
    timings = json.loads((run_dir / "timings.json").read_text())
    assert main(args) == 0
    second = capsys.readouterr().out
    assert {rel: (run_dir / rel).stat().st_mtime_ns for rel in mtimes} == mtimes
    # data, simulators, base model, rollouts, rows, SFT, KTO (evaluation caches per method).
    assert second.count("skipped: its outputs exist") == 7, second
    # The no-op rerun keeps the stage times of the run that did the work (report: rewritten).
    rerun_timings = json.loads((run_dir / "timings.json").read_text())
    assert {k: v for k, v in rerun_timings.items() if k != "report"} == {k: v for k, v in timings.items() if k != "report"}

    # A missing simulator is noticed, never answered from the evaluation cache.
    import shutil

    shutil.rmtree(run_dir / "simulators" / "test")
    assert main(["eval", *TINY_RUN, f"run.root={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ulrec: error: ") and "simulators/test: no saved simulator" in err and "\n" not in err
