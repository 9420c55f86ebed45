"""The rollout benchmark's step-wave limit groups requests exactly as the rollout's dependency
chain allows: every user's step-k request in one wave, waves in step order, nothing lost."""

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "rollout_throughput.py"
_spec = importlib.util.spec_from_file_location("rollout_throughput", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_step_waves_group_by_step_in_step_order():
    requests = [(0, "a0", 10), (0, "b0", 11), (1, "a1", 12), (2, "a2", 13), (1, "b1", 14)]
    waves = bench.step_waves(requests)
    assert waves == [(["a0", "b0"], [10, 11]), (["a1", "b1"], [12, 14]), (["a2"], [13])]
    assert sorted(p for prompts, _ in waves for p in prompts) == sorted(r[1] for r in requests)


def test_step_waves_of_nothing():
    assert bench.step_waves([]) == []
