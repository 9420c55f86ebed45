"""cluster.yaml against Ray's own cluster-config schema, and the `ray submit` entry script."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
ENTRY = ROOT / "scripts" / "cluster_entry.py"


def load_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def local_variant(config: dict) -> dict:
    """cluster.yaml with the commented on-prem block applied as its comments instruct."""
    text = CLUSTER_YAML.read_text()
    block = text[text.index("# BEGIN local provider") : text.index("# END local provider")]
    lines = [line[2:] for line in block.splitlines()[1:]]
    local = yaml.safe_load("\n".join(lines))
    out = {k: v for k, v in copy.deepcopy(config).items() if k not in ("available_node_types", "head_node_type")}
    out.update(local)
    return out


def test_cluster_yaml_matches_rays_schema():
    config = load_cluster()
    jsonschema.validate(config, ray_schema())
    # The launcher's own path: merge provider defaults, then validate (what `ray up` does).
    validate_config(prepare_config(config))


def test_local_provider_variant_matches_rays_schema():
    local = local_variant(load_cluster())
    assert local["provider"]["type"] == "local"
    jsonschema.validate(local, ray_schema())
    prepared = prepare_config(local)
    validate_config(prepared)
    assert prepared["available_node_types"]["local.cluster.node"]["max_workers"] == len(local["provider"]["worker_ips"])


def test_node_types_cpu_head_and_gpu_workers():
    config = load_cluster()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # nothing heavy is scheduled next to the GCS
    assert head["node_config"]["InstanceType"].startswith(("m5", "m6", "c5", "c6"))
    gpu_types = {name: t["node_config"]["InstanceType"] for name, t in types.items() if name != config["head_node_type"]}
    assert gpu_types["policy_gpu"].startswith(("g5", "g6", "p4", "p5"))
    assert gpu_types["trainer_gpu"].startswith(("p4", "p5"))
    assert types["policy_gpu"]["resources"] == {"policy_gpu": 1}


def test_setup_installs_project_with_gpu_extra_and_pinned_torch():
    config = load_cluster()
    setup = "\n".join(config["setup_commands"])
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_pin = re.search(r'"(torch==[^"]+)"', pyproject).group(1)
    assert f'"{torch_pin}"' in setup
    assert '-e "$HOME/ulrec[gpu]"' in setup
    assert config["file_mounts"] == {"~/ulrec": "."}
    assert "gpu" in re.search(r"\[project\.optional-dependencies\](.*?)\n\[", pyproject, re.S).group(1)


def load_entry():
    spec = importlib.util.spec_from_file_location("cluster_entry", ENTRY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_entry_builds_the_ulrec_command():
    entry = load_entry()
    assert entry.cli_args(["--config", "configs/steam.yaml"]) == [
        "run", "--config", "configs/steam.yaml", "ray.address=auto"]
    assert entry.cli_args(["--config", "c.yaml", "--stage", "train kto", "kto.beta=0.05", "ray.address=10.0.0.1:6379"]) == [
        "train", "kto", "--config", "c.yaml", "ray.address=auto", "kto.beta=0.05", "ray.address=10.0.0.1:6379"]


def test_entry_runs_from_home_dir_like_ray_submit(tmp_path: Path):
    """`ray submit` copies the script to ~ and runs it there: it must find the repository through
    ULREC_HOME and hand over to the CLI (a missing config → the CLI's one-line error, exit 2)."""
    copied = tmp_path / "cluster_entry.py"
    copied.write_text(ENTRY.read_text())
    env = {"ULREC_HOME": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(copied), "--config", "configs/does-not-exist.yaml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"(in {ROOT})" in proc.stdout
    assert "configs/does-not-exist.yaml" in proc.stderr


def test_entry_reports_missing_repository(tmp_path: Path, monkeypatch):
    entry = load_entry()
    monkeypatch.setenv("ULREC_HOME", str(tmp_path / "nowhere"))
    assert entry.main(["--config", "configs/steam.yaml"]) == 1


@pytest.mark.parametrize("name", ["quickstart", "steam", "amazon"])
def test_entry_config_overrides_validate(name):
    """What the entry script passes (the config plus ray.address=auto) is a valid config."""
    from ulrec.config import load_config

    cfg = load_config(str(ROOT / "configs" / f"{name}.yaml"), ["ray.address=auto"])
    assert cfg.ray.address == "auto"


@pytest.mark.parametrize("config", ["configs/steam.yaml", "configs/amazon.yaml"])
def test_gpu_configs_ask_for_resources_their_node_types_offer(config):
    """Each kind of work names the node type it belongs on, and that type offers the resource."""
    from ulrec.config import load_config

    cfg = load_config(str(ROOT / config), [])
    offered = {name: t["resources"] for name, t in load_cluster()["available_node_types"].items()}

    def node_types_for(asked: dict) -> set[str]:
        return {name for name, res in offered.items() if all(res.get(k, 0) >= v for k, v in asked.items())}

    assert node_types_for(cfg.rollout.replica_resources) == {"policy_gpu"}
    assert node_types_for(cfg.rollout.shard_resources) == {"cpu_worker"}
    for stage in (cfg.sft, cfg.kto):
        assert node_types_for(stage.scaling.resources_per_worker) == {"trainer_gpu"}
        # the 8 workers fit the one trainer node's 8 trainer_gpu units
        assert stage.scaling.num_workers * stage.scaling.resources_per_worker["trainer_gpu"] <= offered["trainer_gpu"]["trainer_gpu"]
