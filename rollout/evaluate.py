"""`ulrec eval`: every LLM method through one code path (paper §4.1.4).

Test simulator, ``eval.num_users`` test users drawn with a fixed seed, temperature
``eval.temperature``, horizon ``eval.max_steps``, one run per seed in ``eval.seeds``. Each method's
episodes go to ``eval/<method>/episodes`` and its summary to ``eval/<method>/summary.json``; a
method whose inputs did not change is not evaluated again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ulrec.policy import resolve_model_dir
from ulrec.config import Config
from ulrec.errors import UlrecError
from ulrec.evaluation import (
    ABLATION_METHODS,
    METHOD_CHECKPOINTS,
    METHOD_LABELS,
    read_episodes,
    select_eval_users,
    summarize_episodes,
)
from ulrec.io import read_json, write_json
from ulrec.layout import EPISODES_DIR, SUMMARY_FILE
from ulrec.resume import StageInputs, run_stage
from ulrec.data import prepared_data
from ulrec.simulator.fit import simulator_fingerprint


def method_model_dir(cfg: Config, method: str) -> Path:
    if method == "collector":
        from rollout.driver import collector_model_dir

        return collector_model_dir(cfg)
    if method not in METHOD_CHECKPOINTS:
        known = ", ".join(METHOD_CHECKPOINTS)
        raise UlrecError(f"eval.methods: unknown method '{method}' (known: {known})")
    sub = METHOD_CHECKPOINTS[method]
    return resolve_model_dir(cfg) if sub is None else cfg.layout.checkpoint(sub)


def eval_methods(cfg: Config) -> list[str]:
    methods = list(cfg.eval.methods)
    # Paper Fig. 5: the collector's own test Len beside ULRec, whenever one collected the data.
    if cfg.rollout.collector.model and "collector" not in methods:
        methods.insert(0, "collector")
    elif cfg.rollout.collector.planner == "billp" and "billp" not in methods:
        methods.insert(0, "billp")  # BiLLP on the base model collected: its row is the collector's
    if cfg.eval.ablations:
        methods += [m for m in ABLATION_METHODS if m not in methods]
    return methods


# One method's evaluation: its model by content, the users and split it plays, the simulator of
# that split (a refit or deleted simulator never serves cached results), the prepared data, and the
# protocol it is played under (eval.temperature / max_steps / seeds). Not the whole eval section:
# which methods are listed, or whether ablations are, does not change a method's numbers.
# BiLLP also reads its own section and the training rollouts its memory is built from.
EVAL_STAGE = StageInputs(
    "evaluation", ("env", "policy", "grounding"),
    lambda cfg, model_dir, users, split, collector, billp=False: {
        "model": Path(model_dir), "users": list(users), "split": split, "collector": collector,
        "data": prepared_data(cfg.run_dir), "simulator": simulator_fingerprint(cfg, split),
        "protocol": {"temperature": cfg.eval.temperature, "max_steps": cfg.eval.max_steps,
                     "seeds": list(cfg.eval.seeds)},
        **({"billp": cfg.billp.model_dump(), "rollouts": billp_memory_rollouts(cfg)} if billp else {})},
)


def method_players(cfg: Config, method: str):
    """How ``method`` plays: the collector section it plays with (the Collector row only), and
    whether the BiLLP planner drives its model (BiLLP, and a collector whose planner is BiLLP)."""
    collector = cfg.rollout.collector if method == "collector" else None
    return collector, method == "billp" or (collector is not None and collector.planner == "billp")


def billp_memory_rollouts(cfg: Config) -> Path:
    """The training rollouts BiLLP's memory is built from: the collector model's plain ones (those
    the planner-collector's memory came from, when ``rollout.collector.planner`` is ``billp``)."""
    if cfg.rollout.collector.planner == "billp":
        return cfg.layout.plain_rollouts("train")
    return cfg.layout.rollouts("train")


BILLP_MEMORY_FILE = "memory.json"


def billp_setup(cfg: Config, method_dir: Path):
    """BiLLP's memory from the training rollouts (train simulator: never the test users), saved
    beside its evaluation as ``memory.json``; returns the setup the replicas build the planner from."""
    from rollout.driver import build_billp_setup

    return build_billp_setup(cfg, billp_memory_rollouts(cfg), Path(method_dir) / BILLP_MEMORY_FILE)



def evaluate_model(
    cfg: Config, method: str, model_dir: Path, users: list[int], out_root: Path | None = None,
    split: str = "test",
) -> dict[str, Any]:
    """Evaluate one model directory on the ``split`` simulator (the test one, except for selection
    on validation users of the train one); returns its summary (cached)."""
    from rollout.driver import run_rollout

    from ulrec.checks import check_model_dir

    if not (model_dir / "config.json").is_file():
        raise UlrecError(f"{method}: no model at {model_dir} (run the stage that produces it first)")
    check_model_dir(model_dir, f"{method} model")
    method_dir = (out_root or cfg.layout.eval) / method
    collector, is_billp = method_players(cfg, method)

    def build(_key: str) -> tuple[dict[str, Any], dict[str, Any]]:
        billp = billp_setup(cfg, method_dir) if is_billp else None
        rollout_summary = run_rollout(
            cfg,
            model_dir=str(model_dir),
            split=split,
            user_ids=users,
            seeds=list(cfg.eval.seeds),
            temperature=cfg.eval.temperature,
            max_steps=cfg.eval.max_steps,
            out_dir=method_dir / EPISODES_DIR,
            policy_name=method,
            collector=collector,
            billp=billp,
        )
        summary = summarize_episodes(read_episodes(method_dir / EPISODES_DIR))
        summary.update(
            method=method,
            split=split,
            label=METHOD_LABELS.get(method, method),
            model_dir=str(model_dir),
            tokens_per_s=rollout_summary.get("tokens_per_s"),
            wall_s=rollout_summary.get("wall_s"),
            # Actor start-up (new replicas, or kept ones switched to this model: rollout.keep_engines).
            startup_s=rollout_summary.get("startup_s"),
            engines=rollout_summary.get("engines"),
        )
        if billp is not None:
            summary["billp"] = {**cfg.billp.model_dump(), **billp.memory.stats,
                                "critic": billp.memory.describe()}
        write_json(method_dir / SUMMARY_FILE, summary)
        return summary, {}

    return run_stage(EVAL_STAGE, cfg, method_dir, build, required=(SUMMARY_FILE, EPISODES_DIR),
                     skipped=lambda _marker: read_json(method_dir / SUMMARY_FILE),
                     model_dir=model_dir, users=users, split=split,
                     collector=collector.model_dump() if collector else None, billp=is_billp)


def eval_stage(cfg: Config) -> dict[str, Any]:
    from rollout.driver import wraps_engine
    from rollout.engines import kept_engines

    users = select_eval_users(cfg, "test")
    results = {}
    methods = eval_methods(cfg)

    def wrapped(method: str) -> bool:  # its replicas are its own: after the methods sharing the pool
        return wraps_engine(*method_players(cfg, method))

    with kept_engines(cfg.rollout.keep_engines):  # the plain methods on one pool of replicas
        summaries = {method: evaluate_model(cfg, method, method_model_dir(cfg, method), users)
                     for method in sorted(methods, key=wrapped)}
    for method in methods:
        summary = summaries[method]
        results[method] = {
            "Len": f"{summary['len_mean']:.2f} ± {summary['len_std']:.2f}",
            "Traj Reward": f"{summary['reward_mean']:.2f} ± {summary['reward_std']:.2f}",
        }
    return results
