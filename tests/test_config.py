"""The config schema: defaults, YAML overrides, dotted CLI overrides, one-line errors."""

from pathlib import Path

import pytest

from ulrec.cli import main
from ulrec.config import Config, ConfigError, load_config, parse_overrides, section_hash

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_match_paper_protocol():
    cfg = Config()
    assert cfg.env.reward_threshold == 2.0 and cfg.env.window == 4 and cfg.env.max_steps == 100
    assert cfg.eval.num_users == 100 and cfg.eval.temperature == 0.5 and len(cfg.eval.seeds) == 3
    assert cfg.kto.beta == 0.01 and cfg.kto.alpha == 0.1 and cfg.kto.learning_rate == 5e-6


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("policy:\n  temperature: 0.9\ndata:\n  dataset: synthetic\n")
    cfg = load_config(path, ["policy.temperature=0.25", "baselines.algos=dqn,a2c", "eval.seeds=[1, 2]"])
    assert cfg.policy.temperature == 0.25
    assert cfg.data.dataset == "synthetic"
    assert cfg.baselines.algos == ["dqn", "a2c"]
    assert cfg.eval.seeds == [1, 2]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("policy.temprature=0.5", "unknown config key 'policy.temprature'"),
        ("nosection.x=1", "unknown config key 'nosection'"),
        ("policy.temperature=hot", "config key 'policy.temperature'"),
        ("env.window=-1", "config key 'env.window'"),
        ("data.dataset=netflix", "config key 'data.dataset'"),
        ("kto.scaling.num_workers=0", "config key 'kto.scaling.num_workers'"),
        ("env.distance_threshold=-3", "config key 'env'"),
    ],
)
def test_bad_values_name_the_dotted_key(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert expected in msg and "\n" not in msg


def test_malformed_override_and_file(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["policy.temperature"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_cli_reports_config_error_as_one_line(capsys):
    rc = main(["data", "stats", "policy.temprature=1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "policy.temprature" in err


def test_section_hash_tracks_only_named_sections():
    a = load_config(None, ["policy.temperature=0.1"])
    b = load_config(None, ["policy.temperature=0.2"])
    assert section_hash(a, "data", "env") == section_hash(b, "data", "env")
    assert section_hash(a, "policy") != section_hash(b, "policy")


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_validate(name):
    load_config(CONFIGS / name)
