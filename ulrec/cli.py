"""`ulrec`: the one front door.

Every stage is a subcommand taking ``--config`` and dotted overrides (``policy.temperature=0.5``).
This module is the sanctioned exception to the layering rule: it stands on top of everything and
imports each layer (rollout/, train/, serve/) lazily inside its subcommand, so ``ulrec data`` works
without Ray being started.

User errors (bad config, bad data, bad arguments) print one line to stderr and exit non-zero:
2 for configuration errors, 1 for input/data errors.

The terminal shows the stage headers, one result line per stage and the results; everything the
libraries print goes to ``runs/<name>/logs/ulrec.log`` (``ulrec.console``). ``-v`` / ``--verbose``
anywhere on the command line (or ``ULREC_VERBOSE=1``) shows it all on the terminal instead.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, List, Optional

import typer

from ulrec.config import Config, ConfigError, load_config
from ulrec.console import routed, say
from ulrec.errors import UlrecError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
data_app = typer.Typer(no_args_is_help=True, help="Datasets → Parquet.")
env_app = typer.Typer(no_args_is_help=True, help="Simulated users.")
model_app = typer.Typer(no_args_is_help=True, help="Base model.")
train_app = typer.Typer(no_args_is_help=True, help="ULRec training stages (Ray Train).")
app.add_typer(data_app, name="data")
app.add_typer(env_app, name="env")
app.add_typer(model_app, name="model")
app.add_typer(train_app, name="train")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML file overriding the defaults.")
OverridesArg = typer.Argument(None, help="Dotted overrides, e.g. policy.temperature=0.5")


def _defaults_env() -> None:
    from ulrec.runtime_env import apply_defaults

    apply_defaults(quiet_wandb=not _VERBOSE[0])


_VERBOSE: list[bool] = [False]  # set by main() from -v / --verbose / ULREC_VERBOSE


def _routed_output(cfg: Config):
    """This command's library output into the run's log (see ``ulrec.console``)."""
    return routed(cfg.layout.console_log, verbose=_VERBOSE[0])


# The config of this invocation, once it validated: an unexpected failure's traceback goes to its
# run directory's log rather than to the terminal.
_LOADED: list[Config] = []


def _load(config: Optional[str], overrides: Optional[List[str]]) -> Config:
    cfg = load_config(config, overrides or [])
    _LOADED[:] = [cfg]
    return cfg


def _error_log_path() -> "Path":
    import tempfile
    import time
    from pathlib import Path

    base = _LOADED[0].layout.logs if _LOADED else Path(tempfile.gettempdir()) / "ulrec-logs"
    return base / f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def _report_unexpected(exc: BaseException) -> int:
    """A failure that is not a known input error (a bug, a dead Ray actor, an out-of-memory kill):
    one line for the user, the full traceback in a log file it names."""
    import traceback

    first = (str(exc).strip().splitlines() or [""])[0][:300]
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        path = _error_log_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        where = f"traceback in {path}"
    except OSError:
        where = "traceback could not be written"
    print(f"ulrec: error: {type(exc).__name__}: {first} ({where})", file=sys.stderr)
    return 1


def _show(result: Any) -> None:
    if result is None:
        return
    if isinstance(result, str):
        say(result)
        return
    import json

    say(json.dumps(result, indent=2, sort_keys=True, default=str))


def _stage(config: Optional[str], overrides: Optional[List[str]], stage: str) -> None:
    """Validate the config first (so config errors never wait on heavy imports), then run the stage
    function named ``module:function``."""
    cfg = _load(config, overrides)
    with _routed_output(cfg):
        result = _resolve(stage)(cfg)
    _show(result)


# -------------------------------------------------------------------------------------------- data
@data_app.command("prepare")
def data_prepare(config: Optional[str] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """Read the raw dataset, filter, split by time, write Parquet and stats."""
    cfg = _load(config, overrides)
    from ulrec.data import prepare_data, stats_table

    stats = prepare_data(cfg)
    say(stats_table(stats))


@data_app.command("stats")
def data_stats(config: Optional[str] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """Print the stats of the prepared dataset (like the paper's Table 3)."""
    cfg = _load(config, overrides)
    from ulrec.data import load_stats, stats_table

    say(stats_table(load_stats(cfg)))


# ------------------------------------------------------------------------------------- simulators
@env_app.command("fit")
def env_fit(config: Optional[str] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """Fit and save the train and test simulators; print fit quality and τ_d calibration."""
    _stage(config, overrides, "ulrec.simulator.fit:fit_simulators")


# ------------------------------------------------------------------------------------------ model
@model_app.command("init")
def model_init(config: Optional[str] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """The base model (model.source): the embedded small Llama, SmolLM2-135M-Instruct, a GGUF file or an HF dir."""
    _stage(config, overrides, "ulrec.model_init:build_base_model")


# ---------------------------------------------------------------------------------------- rollout
@app.command("rollout")
def rollout(config: Optional[str] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """Run simulated users against policy replicas on Ray; write episodes as Parquet."""
    _stage(config, overrides, "rollout.driver:rollout_stage")


# --------------------------------------------------------------------------------------- training
@train_app.command("rows")
def train_rows(config: Optional[str] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """Turn the training rollouts into SFT and KTO rows (Parquet)."""
    _stage(config, overrides, "train.rows:rows_stage")


@train_app.command("sft")
def train_sft(config: Optional[str] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """Stage 1 (ULRec-P): SFT on positives under Ray Train."""
    _stage(config, overrides, "train.stages:sft_stage")


@train_app.command("kto")
def train_kto(config: Optional[str] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """Stage 2 (ULRec): KTO on title tokens + α·SFT under Ray Train."""
    _stage(config, overrides, "train.stages:kto_stage")


# ------------------------------------------------------------------------------------- evaluation
@app.command("eval")
def evaluate(config: Optional[str] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """Evaluate methods on the test simulator (paper §4.1.4)."""
    _stage(config, overrides, "rollout.evaluate:eval_stage")


@app.command("report")
def report(config: Optional[str] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """Write report.md, results.json and plots from the run directory."""
    _stage(config, overrides, "ulrec.report:report_stage")


# The main job. Each stage writes under the run directory and returns at once when its outputs exist
# for the same inputs (its resume key: ulrec/resume.py), so an interrupted run resumes where it stopped.
PIPELINE = [
    ("data", "ulrec.data:prepare_data"),
    ("simulators", "ulrec.simulator.fit:fit_simulators"),
    ("base model", "ulrec.model_init:build_base_model"),
    ("training rollouts", "rollout.driver:rollout_stage"),
    ("feedback rows", "train.rows:rows_stage"),
    ("SFT (ULRec-P)", "train.stages:sft_stage"),
    ("KTO (ULRec)", "train.stages:kto_stage"),
]


def _resolve(stage: str) -> Callable[[Config], Any]:
    """The stage function named ``module:function`` (imported only now: heavy layers stay unloaded
    until a stage needs them)."""
    import importlib

    module_name, fn_name = stage.split(":")
    return getattr(importlib.import_module(module_name), fn_name)


def _call(stage: str, cfg: Config) -> Any:
    return _resolve(stage)(cfg)


def _stage_line(result: Any, elapsed: float) -> str:
    """The one-line result of a pipeline stage."""
    if isinstance(result, dict) and result.get("skipped"):
        return "   skipped: its outputs exist for this config"
    facts = []
    if isinstance(result, dict):
        for key in ("episodes", "len_mean", "positives", "negatives", "train_loss", "loss"):
            value = result.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                facts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return f"   done in {elapsed:.0f} s" + (f" ({', '.join(facts)})" if facts else "")


def _did_work(run_dir: "Path", since: float) -> bool:
    """True when a stage marked some output complete after ``since`` (a skipped stage marks none)."""
    from ulrec.io import STAGE_FILE

    return any(p.stat().st_mtime >= since for p in run_dir.rglob(STAGE_FILE))


def _sweep_before(cfg: Config) -> str:
    """The pipeline step the sweep runs before: stage 1 when it searches SFT settings too."""
    from train.sweep import sft_grid

    return "SFT (ULRec-P)" if sft_grid(cfg) else "KTO (ULRec)"


class _StepRunner:
    """Runs the steps of ``ulrec run`` one way: a header, the stage, one result line, its time
    (a step that did no work keeps the time of the run that did: ``timings.json``)."""

    def __init__(self, cfg: Config) -> None:
        from ulrec.io import read_json

        self.run_dir = cfg.run_dir
        self.path = cfg.layout.timings
        self.previous = read_json(self.path) if self.path.is_file() else {}
        self.timings: dict[str, float] = {}

    def step(self, name: str, fn: Callable[[], Any], *, line: bool = True) -> Any:
        import time

        started, wall = time.perf_counter(), time.time()
        say(f"== {name}")
        result = fn()
        elapsed = time.perf_counter() - started
        if line:
            say(_stage_line(result, elapsed))
        if name in self.previous and not _did_work(self.run_dir, wall):
            elapsed = self.previous[name]
        self.timings[name] = elapsed
        return result

    def save(self) -> None:
        from ulrec.io import write_json

        write_json(self.path, self.timings)


def _sweep_step(cfg: Config) -> tuple[dict, Config]:
    from train.sweep import adopt_pick

    sweep = _call("train.sweep:sweep_stage", cfg)
    return sweep, adopt_pick(cfg, sweep)


def run_pipeline(cfg: Config) -> str:
    if cfg.rollout.split != "train":
        raise UlrecError("rollout.split must be 'train' for `ulrec run` (training data comes from train users)")
    # One pool of policy replicas for every rollout of the run (rollout.keep_engines).
    with _resolve("rollout.engines:kept_engines")(cfg.rollout.keep_engines):
        return _run_pipeline(cfg)


def _run_pipeline(cfg: Config) -> str:
    runner = _StepRunner(cfg)
    stages = [s for s in PIPELINE if not (cfg.policy.model and s[0] == "base model")]  # a named model replaces it
    for name, stage in stages:
        if cfg.pipeline.use_sweep_pick and name == _sweep_before(cfg):
            # Training settings chosen on validation users of the train simulator (never test).
            sweep, cfg = runner.step("sweep on validation users", lambda: _sweep_step(cfg), line=False)
            if "sft_pick" in sweep:
                say("   SFT pick: " + ", ".join(f"{k} {sweep['sft_pick'][k]:g}" for k in ("learning_rate", "epochs")))
            say("   pick: " + ", ".join(f"{k} {sweep['pick'][k]:g}" for k in ("beta", "alpha", "learning_rate", "epochs")))
        runner.step(name, lambda: _call(stage, cfg))
    if cfg.eval.ablations:
        for variant in ("no_sft", "no_kto"):
            ablation = cfg.model_copy(deep=True)
            ablation.kto.variant = variant
            runner.step(f"ablation {variant}", lambda: _call("train.stages:kto_stage", ablation))
    if cfg.pipeline.rounds > 1:
        # Round 1's evaluation first: later rounds report against it.
        _call("rollout.evaluate:eval_stage", cfg)
        runner.step(f"iterative rounds 2..{cfg.pipeline.rounds}", lambda: _call("train.rounds:rounds_stage", cfg))
    if cfg.baselines.enabled:
        runner.step("RL baselines", lambda: _call("train.baselines.run:baselines_stage", cfg))
    runner.step("evaluation", lambda: _call("rollout.evaluate:eval_stage", cfg))
    runner.save()  # the report lists the stage times so far
    out = runner.step("report", lambda: _call("ulrec.report:report_stage", cfg), line=False)
    runner.save()
    total = sum(runner.timings.values())
    return f"{out}\nstage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in runner.timings.items()) + f"; total {total:.0f}"


@app.command("run")
def run(config: Optional[str] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """Chain every stage; finished stages (same inputs) are skipped."""
    cfg = _load(config, overrides)
    with _routed_output(cfg) as log:
        if log is not None:
            say(f"ulrec run: {cfg.run_dir}; library output in {log} (-v shows it here)")
        result = run_pipeline(cfg)
    _show(result)


@app.command("sweep")
def sweep(config: Optional[str] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """The KTO grid (paper Fig. 4: β × α, lr, epochs), scored on validation users of the train simulator."""
    _stage(config, overrides, "train.sweep:sweep_stage")


@app.command("baselines")
def baselines(config: Optional[str] = ConfigOpt, overrides: Optional[List[str]] = OverridesArg) -> None:
    """Train and evaluate the RL baselines on RLlib."""
    _stage(config, overrides, "train.baselines.run:baselines_stage")


@app.command("serve")
def serve(
    config: Optional[str] = ConfigOpt,
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="HF model directory to serve."),
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Serve the tuned recommender over HTTP with Ray Serve."""
    extra = list(overrides or [])
    if checkpoint:
        extra.append(f"serve.checkpoint={checkpoint}")
    _stage(config, extra, "serve.app:serve_stage")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    flags = {"-v", "--verbose"}
    _VERBOSE[0] = any(a in flags for a in argv) or os.environ.get("ULREC_VERBOSE", "") not in ("", "0")
    argv = [a for a in argv if a not in flags]
    _defaults_env()
    _LOADED.clear()  # a config of an earlier call (tests call main repeatedly) is not this one's
    try:
        app(args=argv, standalone_mode=False)
    except ConfigError as exc:
        print(f"ulrec: error: {exc}", file=sys.stderr)
        return 2
    except UlrecError as exc:
        print(f"ulrec: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("ulrec: interrupted", file=sys.stderr)
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            return 1
        return _report_unexpected(exc)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
