"""scripts/temperature_diagnostic.py refuses bad input with one line and exit 1 (its evaluations are
`evaluate_model` on the sweep's validation users, tested with the sweep)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("temperature_diagnostic", ROOT / "scripts" / "temperature_diagnostic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_sweep_it_names_the_missing_results(tmp_path, capsys):
    rc = _script().main(["--config", str(ROOT / "configs/quickstart.yaml"), f"run.root={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.count("\n") == 0
    assert "no sweep results" in err and "ulrec sweep" in err


def test_bad_temperatures_and_unknown_keys_are_one_line_errors(tmp_path, capsys):
    script = _script()
    assert script.main(["--config", str(ROOT / "configs/quickstart.yaml"), "--temperatures", "0.5,hot"]) == 1
    assert "comma-separated numbers" in capsys.readouterr().err
    assert script.main(["--config", str(ROOT / "configs/quickstart.yaml"), "no.such_key=1"]) == 1
    assert "unknown config key" in capsys.readouterr().err
