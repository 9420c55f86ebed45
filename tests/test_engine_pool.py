"""Rules of engines that live across stages: which model directories a running engine can switch
to in place, and when kept replicas give way to a job."""

from __future__ import annotations

import json

from rollout.engines import fits_beside
from ulrec.policy.weights import swap_blocker


def model_dir(path, **config):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                                   "_name_or_path": str(path), **config}))
    (path / "tokenizer.json").write_text('{"vocab": [1, 2]}')
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}", "name_or_path": str(path)}))
    return path


def test_only_weights_may_differ_for_an_in_place_switch(tmp_path):
    a = model_dir(tmp_path / "a")
    assert swap_blocker(a, model_dir(tmp_path / "b", transformers_version="9", use_cache=False)) is None
    assert swap_blocker(a, model_dir(tmp_path / "c", hidden_size=128)) == "config.json differs"
    d = model_dir(tmp_path / "d")
    (d / "tokenizer.json").write_text('{"vocab": [1, 3]}')
    assert swap_blocker(a, d) == "tokenizer.json differs"
    e = model_dir(tmp_path / "e")
    (e / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ y }}"}))
    assert swap_blocker(a, e) == "tokenizer_config.json differs"
    f = model_dir(tmp_path / "f")
    (f / "chat_template.jinja").write_text("{{ z }}")
    assert swap_blocker(a, f) == "chat_template.jinja differs"
    g = model_dir(tmp_path / "g")
    (g / "adapter_config.json").write_text("{}")
    assert "LoRA adapter" in swap_blocker(a, g)
    assert swap_blocker(a, tmp_path / "missing") == f"{tmp_path / 'missing'} has no config.json"


def test_a_job_runs_beside_kept_replicas_only_where_both_fit():
    two_cpus = {"CPU": 2.0, "memory": 1e9}
    assert not fits_beside({"CPU": 1.0}, {"CPU": 2.0}, two_cpus)  # the quickstart's training
    assert fits_beside({"CPU": 1.0}, {"CPU": 1.0}, two_cpus)
    cluster = {"CPU": 64.0, "GPU": 8.0, "policy_gpu": 2.0, "trainer_gpu": 6.0}
    replicas = {"CPU": 2.0, "GPU": 2.0, "policy_gpu": 2.0}
    assert fits_beside(replicas, {"CPU": 6.0, "GPU": 6.0, "trainer_gpu": 6.0}, cluster)
    assert not fits_beside(replicas, {"CPU": 8.0, "GPU": 8.0, "trainer_gpu": 8.0}, cluster)
    assert not fits_beside({}, {"GPU": 1.0}, {"CPU": 2.0})  # a resource the cluster lacks


def test_run_time_switches_are_not_stage_inputs():
    """Keeping engines or lane affinity changes how a rollout runs, never what it writes: neither
    invalidates finished stages."""
    from ulrec.config import load_config, section_hash

    plain = load_config(None, [])
    switched = load_config(None, ["rollout.keep_engines=false", "rollout.lane_affinity=false"])
    other = load_config(None, ["rollout.num_users=7"])
    assert section_hash(plain, "rollout") == section_hash(switched, "rollout") != section_hash(other, "rollout")
