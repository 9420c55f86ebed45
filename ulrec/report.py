"""The report people read: ``report.md``, ``results.json`` and PNG plots in the run directory.

Tables are shaped like the paper's Table 1 (methods as columns) and Table 2 (ablations as rows).
Every evaluated method — LLM policies and RL baselines — is found under ``eval/<method>/``.
"""

from __future__ import annotations

import datetime as _dt
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ulrec.config import Config
from ulrec.errors import UlrecError
from ulrec.evaluation import EXIT_REASONS, METHOD_LABELS, episode_item_diversity, read_episodes, summarize_episodes
from ulrec.layout import EPISODES_DIR, STAGE1_CHECKPOINT, STAGE2_CHECKPOINT, SUMMARY_FILE, RunLayout
from ulrec.io import STAGE_FILE, atomic_path, read_json, write_json, write_text
from ulrec.tracking import read_metrics

LLM_ORDER = ["collector", "base", "ulrec-p", "ulrec"]
ABLATION_ORDER = ["base", "ulrec-p", "wo-sft", "wo-kto", "ulrec"]
BASELINE_ORDER = ["bcq", "cql", "crr", "dqn", "sqn", "a2c", "dorl"]
# The LLM planner column (paper Table 1: between the RL baselines and the LLM methods).
PLANNER_ORDER = ["billp"]


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _episodes_path(method_dir: Path) -> Path | None:
    path = method_dir / EPISODES_DIR
    return path if path.exists() else None


def collect_results(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Summaries of every evaluated method under ``run_dir/eval`` (method → summary)."""
    results: dict[str, dict[str, Any]] = {}
    eval_dir = RunLayout(run_dir).eval
    if not eval_dir.is_dir():
        return results
    for method_dir in sorted(p for p in eval_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (method_dir / SUMMARY_FILE).is_file():
            results[method_dir.name] = read_json(method_dir / SUMMARY_FILE)
            if "items" not in results[method_dir.name] and (path := _episodes_path(method_dir)) is not None:
                # summaries written before item diversity was measured: the episodes have it
                results[method_dir.name]["items"] = episode_item_diversity(read_episodes(path))
        elif (path := _episodes_path(method_dir)) is not None:
            summary = summarize_episodes(read_episodes(path))
            summary.update(method=method_dir.name, label=_label(method_dir.name))
            results[method_dir.name] = summary
    return results


def _ordered(results: dict[str, Any], order: list[str]) -> list[str]:
    known = [m for m in order if m in results]
    return known


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}"


def table_main(results: dict[str, dict[str, Any]]) -> str:
    """Paper Table 1: baselines and LLM methods as columns; Len and Traj Reward as rows."""
    methods = _ordered(results, BASELINE_ORDER + PLANNER_ORDER + LLM_ORDER)
    methods += [m for m in results if m not in methods and m not in ("wo-sft", "wo-kto")]
    if not methods:
        return "_no evaluated methods_\n"
    head = "| | " + " | ".join(_label(m) for m in methods) + " |\n"
    sep = "|---|" + "---|" * len(methods) + "\n"
    len_row = "| Len ↑ | " + " | ".join(_fmt(results[m]["len_mean"], results[m]["len_std"]) for m in methods)
    rew_row = "| Traj Reward ↑ | " + " | ".join(
        _fmt(results[m]["reward_mean"], results[m]["reward_std"]) for m in methods
    )
    return head + sep + len_row + " |\n" + rew_row + " |\n"


def table_ablation(results: dict[str, dict[str, Any]]) -> str:
    """Paper Table 2: one row per ULRec variant."""
    methods = _ordered(results, ABLATION_ORDER)
    lines = ["| Method | Len ↑ | Traj Reward ↑ |", "|---|---|---|"]
    for m in methods:
        r = results[m]
        lines.append(f"| {_label(m)} | {_fmt(r['len_mean'], r['len_std'])} | {_fmt(r['reward_mean'], r['reward_std'])} |")
    return "\n".join(lines) + "\n"


def table_exits(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| Method | " + " | ".join(EXIT_REASONS) + " | exact titles | substituted | format errors "
        "| distinct items | item entropy | top-10 items' share |",
        "|---|" + "---|" * (len(EXIT_REASONS) + 6),
    ]
    for m, r in results.items():
        shares = " | ".join(f"{100 * r['exit_shares'].get(k, 0.0):.0f}%" for k in EXIT_REASONS)
        g = r.get("grounding", {})

        def pct(v: Any) -> str:
            return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.0f}%"

        items = r.get("items") or {}
        entropy = items.get("entropy")
        lines.append(
            f"| {_label(m)} | {shares} | {pct(g.get('exact'))} | {pct(g.get('substituted'))} | "
            f"{pct(g.get('format_error'))} | {items.get('distinct', '–')} | "
            f"{'–' if entropy is None or np.isnan(entropy) else f'{entropy:.2f}'} | {pct(items.get('top10_share'))} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    _plt().close(fig)
    return path


def plot_len_distribution(run_dir: Path, methods: list[str], path: Path) -> Path | None:
    data, labels = [], []
    for m in methods:
        ep = _episodes_path(RunLayout(run_dir).eval_method(m))
        if ep is None:
            continue
        data.append(pd.read_parquet(ep, columns=["length"])["length"].to_numpy())
        labels.append(_label(m))
    if not data:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(data) + 2), 4))
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30 if len(labels) > 5 else 0)
    ax.set_ylabel("Len (accepted steps per episode)")
    ax.set_title("Interaction length on the test simulator (all users × seeds)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_exit_reasons(results: dict[str, dict[str, Any]], path: Path) -> Path | None:
    if not results:
        return None
    plt = _plt()
    methods = list(results)
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(methods) + 2), 4))
    bottom = np.zeros(len(methods))
    for reason in EXIT_REASONS:
        vals = np.array([100 * results[m]["exit_shares"].get(reason, 0.0) for m in methods])
        ax.bar([_label(m) for m in methods], vals, bottom=bottom, label=reason)
        bottom += vals
    ax.set_ylabel("% of episodes")
    ax.set_title("Why episodes ended")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    return _save(fig, path)


TRAIN_CURVES = {
    STAGE1_CHECKPOINT: ["loss"],
    # Log-ratios rather than TRL's rewards (= β × log-ratio): at β = 0.01 those hide the movement.
    STAGE2_CHECKPOINT: ["loss", "logratio/chosen", "logratio/rejected", "kl", "sft_loss"],
}


def plot_training_curves(run_dir: Path, path: Path) -> Path | None:
    panels = []
    for stage, keys in TRAIN_CURVES.items():
        records = read_metrics(RunLayout(run_dir).checkpoint(stage) / "metrics.jsonl")
        for key in keys:
            pts = [(r.get("step"), r[key]) for r in records if key in r and r.get("step") is not None]
            if pts:
                panels.append((stage, key, pts))
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
    for ax, (stage, key, pts) in zip(axes[0], panels):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker=".")
        ax.set_title(f"{stage.upper()} {key}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_sweep(sweep: dict[str, Any], path: Path) -> Path | None:
    cells = sweep.get("cells", [])
    if not cells:
        return None
    betas = sorted({c["beta"] for c in cells})
    alphas = sorted({c["alpha"] for c in cells})
    grid = np.full((len(alphas), len(betas)), np.nan)
    for c in cells:  # with learning rates / epochs in the grid too, each square shows its best cell
        i, j = alphas.index(c["alpha"]), betas.index(c["beta"])
        grid[i, j] = np.nanmax([grid[i, j], c["len_mean"]])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.6 * len(betas) + 2, 1.2 * len(alphas) + 1.5))
    im = ax.imshow(grid, cmap="viridis", origin="lower")
    ax.set_xticks(range(len(betas)), [str(b) for b in betas])
    ax.set_yticks(range(len(alphas)), [str(a) for a in alphas])
    ax.set_xlabel("β")
    ax.set_ylabel("α")
    for i in range(len(alphas)):
        for j in range(len(betas)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w")
    fig.colorbar(im, ax=ax, label="Len")
    where = "validation users, train simulator" if sweep.get("selection") else "test simulator"
    ax.set_title(f"ULRec Len over the β × α grid\n({where})", fontsize=9)
    return _save(fig, path)


def plot_baseline_curves(results: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """The RL baselines' learning curves: validation Len (train simulator) against the share of the
    budget spent, one line per method (mean over training seeds, each seed faint)."""
    curves = {m: s for m, s in results.items() if s.get("curve")}
    if not curves:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, summary in sorted(curves.items()):
        planned = max(float(summary.get("budget", {}).get("planned") or 1), 1.0)
        line, = ax.plot([p["done"] / planned for p in summary["curve"]], [p["len_mean"] for p in summary["curve"]],
                        marker="o", label=_label(method))
        for seed_curve in (summary.get("curves") or {}).values():
            ax.plot([p["done"] / planned for p in seed_curve], [p["len_mean"] for p in seed_curve],
                    color=line.get_color(), alpha=0.25, linewidth=0.8)
    ax.set_xlabel("share of the training budget")
    ax.set_ylabel("Len, validation users (train simulator)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_rounds(rounds: list[dict[str, Any]], path: Path) -> Path | None:
    if len(rounds) < 2:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r["round"] for r in rounds]
    ax.errorbar(xs, [r["len_mean"] for r in rounds], yerr=[r["len_std"] for r in rounds], marker="o")
    ax.set_xlabel("round")
    ax.set_ylabel("ULRec Len")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    return _save(fig, path)


# ----------------------------------------------------------------- baselines against convergence
# The methods whose order a small budget must keep (issue: the quickstart against configs/baselines.yaml).
RANKED_BASELINES = ("a2c", "dorl", "dqn")


def _by_len(results: dict[str, dict[str, Any]], methods: list[str]) -> list[str]:
    # Stable on BASELINE_ORDER, so a tie keeps the table's order.
    return sorted(methods, key=lambda m: -results[m]["len_mean"])


def _stopping_points(summary: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Per training seed: budget spent when it stopped, and the point evaluated (its best)."""
    stopped, best = [], []
    for curve in (summary.get("curves") or {}).values():
        if curve:
            stopped.append(float(curve[-1]["done"]))
            top = max(p["len_mean"] for p in curve)
            best.append(float(next(p["done"] for p in curve if p["len_mean"] == top)))
    return stopped, best


def converged_comparison(results: dict[str, dict[str, Any]], converged: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """This run's RL baselines against the same methods trained to convergence: Len here and
    there, their ratio, where the converged seeds stopped, and whether both rank the methods alike
    (by mean Len; ``pairs_same_order`` counts the method pairs whose order agrees)."""
    methods = [m for m in BASELINE_ORDER if m in results and m in converged]
    rows = []
    for m in methods:
        here, there = results[m], converged[m]
        stopped, best = _stopping_points(there)
        rows.append({
            "method": m, "len_mean": here["len_mean"], "len_std": here["len_std"],
            "converged_len_mean": there["len_mean"], "converged_len_std": there["len_std"],
            "ratio": here["len_mean"] / there["len_mean"] if there["len_mean"] > 0 else None,
            "budget": here.get("budget", {}).get("planned"), "converged_budget": there.get("budget", {}).get("planned"),
            "unit": there.get("budget", {}).get("unit", ""),
            "converged_stopped_at": stopped, "converged_best_at": best,
        })
    pairs = [(a, b) for i, a in enumerate(methods) for b in methods[i + 1:]]
    same = sum((results[a]["len_mean"] - results[b]["len_mean"]) * (converged[a]["len_mean"] - converged[b]["len_mean"]) > 0
               for a, b in pairs)
    ranked = [m for m in RANKED_BASELINES if m in methods]
    return {
        "rows": rows,
        "ranking": _by_len(results, methods), "converged_ranking": _by_len(converged, methods),
        "pairs_same_order": int(same), "pairs": len(pairs),
        "ranked_methods": ranked,
        "same_order_ranked": _by_len(results, ranked) == _by_len(converged, ranked) if len(ranked) > 1 else None,
    }


def converged_section(cfg: Config, results: dict[str, dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """The report's comparison with ``baselines.converged_run`` (markdown lines, payload)."""
    name = cfg.baselines.converged_run
    if name is None or not any(m in results for m in BASELINE_ORDER):
        return [], {}
    converged_dir = cfg.run.model_copy(update={"name": name}).dir
    converged = {m: s for m, s in collect_results(converged_dir).items() if m in BASELINE_ORDER}
    md = ["## RL baselines against their converged run", ""]
    if not any(m in converged for m in results):
        md += [f"No converged baselines under `{converged_dir}` yet (`ulrec baselines --config "
               "configs/baselines.yaml` trains them).", ""]
        return md, {}
    cmp = converged_comparison(results, converged)

    def spent(values: list[float]) -> str:
        return ", ".join(f"{v / 1000:.0f}k" for v in values) if values else "–"

    def budget(planned: int | None, unit: str) -> str:
        return f"{planned:,} {unit.replace('_', ' ')}" if planned is not None else "–"

    md += [f"Run `{name}`: the same methods trained until their validation Len stopped improving "
           "(each seed's best point evaluated on the test simulator). Len, mean ± std over training seeds.", "",
           "| method | Len here | budget here | Len converged | converged: stopped at / best at (per seed) | here / converged |",
           "|---|---|---|---|---|---|"]
    for r in cmp["rows"]:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else "–"
        md.append(f"| {_label(r['method'])} | {_fmt(r['len_mean'], r['len_std'])} | {budget(r['budget'], r['unit'])} | "
                  f"{_fmt(r['converged_len_mean'], r['converged_len_std'])} | "
                  f"{spent(r['converged_stopped_at'])} / {spent(r['converged_best_at'])} | {ratio} |")
    order = " > ".join(_label(m) for m in cmp["ranking"])
    converged_order = " > ".join(_label(m) for m in cmp["converged_ranking"])
    md += ["", f"By mean Len, here: {order}; converged: {converged_order} "
           f"({cmp['pairs_same_order']} of {cmp['pairs']} pairs in the same order)."]
    if cmp["same_order_ranked"] is not None:
        ranked = ", ".join(_label(m) for m in cmp["ranked_methods"])
        md.append(f"{ranked} in the same order as converged: **{'yes' if cmp['same_order_ranked'] else 'no'}**.")
    md.append("")
    return md, {"run": name, **cmp}


# ------------------------------------------------------------------------------------------ report
BASELINE_BUDGET_KEYS = (
    "online_env_steps", "onpolicy_env_steps", "offline_updates", "offline_episodes", "batch_size",
    "train_max_steps", "dorl_ensemble",
)


def budget_section(cfg: Config, results: dict[str, Any], run_dir: Path) -> list[str]:
    """What the numbers cost: training settings, the baselines' budget, and stage times."""
    md = ["## Budget", ""]
    model = cfg.policy.model or (cfg.model.path if cfg.model.source == "hf" else f"model.source {cfg.model.source}")

    def tuning(section: Any) -> str:
        lora = section.lora
        if not lora.enabled:
            return "full fine-tuning"
        return f"LoRA r {lora.r}, alpha {lora.alpha:g} on {', '.join(lora.target_modules)}"

    md.append(f"- base model: {model}; prompt {cfg.policy.template_file or 'default template'}, "
              f"{cfg.policy.history_length} history titles, chat template {cfg.policy.chat_template}")
    collector = cfg.rollout.collector
    who = collector.model or "the base model"
    if collector.planner == "billp":
        who = f"the BiLLP planner on {who} (its memory from that model's own rollouts of the same users)"
    elif collector.prompt_style == "react":
        who = f"{who}, ReAct prompt (thoughts stripped from the rows)"
    md.append(
        f"- rollouts: {cfg.rollout.num_users} training users × seeds {list(cfg.rollout.seeds)}, temperature "
        f"{cfg.rollout.temperature}, horizon {cfg.rollout.max_steps}; collected by {who}"
    )
    md.append(
        f"- SFT: {cfg.sft.epochs:g} epoch(s), lr {cfg.sft.learning_rate:g}, batch "
        f"{cfg.sft.per_device_batch_size * cfg.sft.gradient_accumulation_steps} × {cfg.sft.scaling.num_workers} worker(s), "
        f"{tuning(cfg.sft)}"
    )
    weight = cfg.kto.undesirable_weight
    rows_stats_path = RunLayout(run_dir).rows() / "stats.json"
    if cfg.kto.on_policy.enabled:  # stage 2 trained on the combined rows
        rows_stats_path = RunLayout(run_dir).on_policy_rows(STAGE1_CHECKPOINT) / "stats.json"
    if weight == "balanced" and rows_stats_path.is_file():
        counts = read_json(rows_stats_path)
        if counts.get("negatives"):
            weight = f"balanced = {cfg.kto.desirable_weight * counts['positives'] / counts['negatives']:.2f}"
    md.append(
        f"- KTO: {cfg.kto.epochs:g} epoch(s), lr {cfg.kto.learning_rate:g}, β {cfg.kto.beta:g}, α {cfg.kto.alpha:g}, "
        f"undesirable weight {weight}, title-only log-ratio {cfg.kto.mask_format_tokens}, {tuning(cfg.kto)}"
    )
    if any(m in results for m in BASELINE_ORDER):
        bl = cfg.baselines
        md.append("- RL baselines: " + ", ".join(f"{k} {getattr(bl, k)}" for k in BASELINE_BUDGET_KEYS)
                  + " (EasyRL4Rec: 100k gradient updates / env steps)")
        over = {m: results[m].get("std_over", "evaluation seeds") for m in BASELINE_ORDER if m in results}
        seeds = sorted({tuple(results[m].get("train_seeds", [])) for m in over})
        md.append(f"- RL baselines' ± : over {', '.join(sorted(set(over.values())))}"
                  + (f" (training seeds {', '.join(str(list(s)) for s in seeds)})" if any(seeds) else ""))
    if "billp" in results and results["billp"].get("billp"):
        b = results["billp"]["billp"]
        md.append(
            f"- BiLLP (base model, no training): {b['reflections']} retrieved reflections, plan "
            f"{b['plan_tokens']} tokens, {b['candidates']} actor proposals per step; memory from "
            f"{b['episodes']} training episodes ({b['steps']} steps, stay rate {b['stay_rate']:.2f}); critic "
            f"train accuracy {b['critic_train_accuracy']:.2f} ({b['critic']})"
        )
    timings_path = RunLayout(run_dir).timings
    if timings_path.is_file():
        timings = read_json(timings_path)
        md.append("- stage times (s, this machine; 0 = skipped, done earlier): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    md.append("")
    return md


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=5
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _tau_d(calibration: dict[str, Any], cfg: Config) -> str:
    """The test simulator's τ_d: calibrated (simulators/calibration.json) or absolute from config."""
    value = calibration.get("thresholds", {}).get("test", cfg.env.distance_threshold)
    if value is None:
        return "not calibrated"
    quantile = f" ({cfg.env.distance_quantile:g} quantile)" if cfg.env.distance_threshold is None else ""
    return f"{value:.4g}{quantile}"


def _built_on(model_dir: Path) -> str:
    """Where the embedded base model was trained: its warm start follows the CPU's kernels."""
    marker = model_dir / STAGE_FILE
    where = read_json(marker).get("built_on") if marker.is_file() else None
    if not where:
        return ""
    return (f" Base model built on {where['cpu']} (torch {where['torch']}, {where['torch_cpu_capability']} "
            "kernels; another CPU builds another model from the same config).")


def build_report(cfg: Config) -> dict[str, Any]:
    run_dir, layout = cfg.run_dir, cfg.layout
    results = collect_results(run_dir)
    if not results:
        raise UlrecError(f"no evaluated methods under {layout.eval} (run `ulrec eval` first)")
    plots_dir = layout.plots
    sweep = read_json(layout.sweep / "results.json") if (layout.sweep / "results.json").is_file() else {}
    rounds_path = layout.rounds_file
    rounds = read_json(rounds_path) if rounds_path.is_file() else []
    plots = {
        "len_distribution": plot_len_distribution(run_dir, list(results), plots_dir / "len_distribution.png"),
        "exit_reasons": plot_exit_reasons(results, plots_dir / "exit_reasons.png"),
        "training_curves": plot_training_curves(run_dir, plots_dir / "training_curves.png"),
        "sweep_heatmap": plot_sweep(sweep, plots_dir / "sweep_heatmap.png"),
        "rounds": plot_rounds(rounds, plots_dir / "rounds.png"),
        "baseline_curves": plot_baseline_curves(results, plots_dir / "baseline_curves.png"),
    }
    plots = {k: str(v.relative_to(run_dir)) for k, v in plots.items() if v is not None}
    commit = _git_commit()
    data_stats = read_json(layout.data_file("stats.json")) if layout.data_file("stats.json").is_file() else {}
    calib_path = layout.simulators / "calibration.json"
    calibration = read_json(calib_path) if calib_path.is_file() else {}
    rows_stats = read_json(layout.rows() / "stats.json") if (layout.rows() / "stats.json").is_file() else {}

    md = [f"# ULRec report: `{cfg.run.name}`", ""]
    md.append(
        f"Dataset **{cfg.data.dataset}**, commit `{commit}`, {_dt.datetime.now().isoformat(timespec='seconds')}. "
        f"Test simulator, {cfg.eval.num_users} test users (seed {cfg.eval.user_seed}), temperature "
        f"{cfg.eval.temperature}, horizon {cfg.eval.max_steps}, seeds {list(cfg.eval.seeds)}; mean ± std over "
        f"seeds. Exit protocol: τ_r = {cfg.env.reward_threshold}, W = {cfg.env.window}, τ_d = "
        f"{_tau_d(calibration, cfg)}"
        + (" (legacy rule)" if cfg.env.legacy else "")
        + "."
        + _built_on(layout.base_model)
    )
    md += ["", "## Main results (paper Table 1)", "", table_main(results)]
    if any(m in results for m in ("wo-sft", "wo-kto")):
        md += ["## Ablations (paper Table 2)", "", table_ablation(results)]
    md += ["## Exit reasons and grounding", "",
           "Items: over every step of a method's episodes, how many distinct catalogue items it "
           "recommended, the entropy (nats) of their distribution, and the 10 most frequent's share.", "",
           table_exits(results)]
    if rows_stats:
        md += ["## Training data from the training rollouts", ""]
        md += [f"- {k}: {v}" for k, v in sorted(rows_stats.items()) if not isinstance(v, (dict, list))]
        md.append("")
    on_policy_path = layout.on_policy_rows(STAGE1_CHECKPOINT) / "stats.json"
    if cfg.kto.on_policy.enabled and on_policy_path.is_file():
        on_policy = read_json(on_policy_path)
        md += ["## Stage 2's on-policy rows (`kto.on_policy`)", "",
               f"ULRec-P played the {cfg.rollout.num_users} training users at temperature {on_policy['temperature']} "
               f"(train simulator): {on_policy['on_policy_positives']} positive and "
               f"{on_policy['on_policy_negatives']} negative rows (negatives by reason: "
               + ", ".join(f"{k} {v}" for k, v in on_policy["on_policy_negatives_by_reason"].items())
               + f"); stage 2 kept {on_policy['keep']}, so it trained on {on_policy['positives']} positives and "
               f"{on_policy['negatives']} negatives.", ""]
    if sweep.get("sft_cells"):
        sft_pick = sweep.get("sft_pick") or {}
        md += ["## SFT sweep (stage 1, scored as ULRec-P)", "",
               f"Scored on {sweep.get('validation_users')} validation users of the train simulator; "
               "✓ = the pick, from which the KTO grid below starts.", "",
               "| lr | epochs | Len | Traj Reward | |", "|---|---|---|---|---|"]
        md += [
            f"| {c['learning_rate']} | {c['epochs']} | {_fmt(c['len_mean'], c['len_std'])} | "
            f"{_fmt(c['reward_mean'], c['reward_std'])} | {'✓' if c.get('name') == sft_pick.get('name') else ''} |"
            for c in sweep["sft_cells"]
        ]
        md.append("")
    if sweep.get("cells"):
        where = (f"{sweep.get('validation_users')} validation users of the train simulator (never the test one)"
                 if sweep.get("selection") else "the test simulator (an older sweep)")
        pick = sweep.get("pick") or {}
        joint = any("sft_cell" in c for c in sweep["cells"])  # the joint grid: which stage 1 each starts from
        md += ["## KTO sweep (paper Fig. 4)", "", f"Scored on {where}; ✓ = the pick (best Len).", "",
               "| β | α | lr | epochs |" + (" from |" if joint else "") + " Len | Traj Reward | |",
               "|---|---|---|---|" + ("---|" if joint else "") + "---|---|---|"]
        md += [
            f"| {c['beta']} | {c['alpha']} | {c.get('learning_rate', '')} | {c.get('epochs', '')} | "
            + (f"{c.get('sft_cell', '')} | " if joint else "")
            + f"{_fmt(c['len_mean'], c['len_std'])} | {_fmt(c['reward_mean'], c['reward_std'])} | "
            f"{'✓' if pick.get('name') and c.get('name') == pick.get('name') else ''} |"
            for c in sweep["cells"]
        ]
        md.append("")
    if len(rounds) > 1:
        md += ["## Iterative rounds", "", "| round | ULRec Len | Traj Reward |", "|---|---|---|"]
        md += [f"| {r['round']} | {_fmt(r['len_mean'], r['len_std'])} | {_fmt(r['reward_mean'], r['reward_std'])} |" for r in rounds]
        md.append("")
    converged_md, converged = converged_section(cfg, results)
    md += converged_md
    md += budget_section(cfg, results, run_dir)
    if plots:
        md += ["## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()] + [""]
    if data_stats:
        md += ["## Data", ""] + [f"- {k}: {v}" for k, v in sorted(data_stats.items()) if not isinstance(v, (dict, list))]
        md.append("")

    report_md = "\n".join(md)
    payload = {
        "run": cfg.run.name,
        "commit": commit,
        "dataset": cfg.data.dataset,
        "results": results,
        "sweep": sweep,
        "rounds": rounds,
        "converged_baselines": converged,
        "plots": plots,
        "config": cfg.model_dump(mode="json"),
    }
    write_json(layout.results, payload)
    write_text(layout.report, report_md)
    _log_to_wandb(cfg, results, plots, commit)
    return {"report": str(layout.report), "table": table_main(results), "results": results, "plots": plots}


RESULT_COLUMNS = ["method", "label", "len_mean", "len_std", "reward_mean", "reward_std",
                  *(f"exit_{r}" for r in EXIT_REASONS)]


def result_rows(results: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """One row per evaluated method, in ``RESULT_COLUMNS`` order (the W&B results table)."""
    return [[m, _label(m), r["len_mean"], r["len_std"], r["reward_mean"], r["reward_std"],
             *(float(r.get("exit_shares", {}).get(k, 0.0)) for k in EXIT_REASONS)]
            for m, r in results.items()]


def _log_to_wandb(cfg: Config, results: dict[str, dict[str, Any]], plots: dict[str, str], commit: str | None) -> None:
    """The numbers people compare runs by, in the run's W&B group: per-method summaries
    (``<method>/len_mean`` …), the results table and the report's plots."""
    from ulrec.tracking import stage_logger

    with stage_logger(cfg, "report", cfg.layout.logs / "report") as logger:
        flat: dict[str, Any] = {"commit": commit or ""}
        for method, r in results.items():
            flat.update({f"{method}/{k}": r[k] for k in ("len_mean", "len_std", "reward_mean", "reward_std")})
        logger.log(flat)
        logger.summary(flat)
        logger.table("results", RESULT_COLUMNS, result_rows(results))
        logger.images({name: cfg.run_dir / rel for name, rel in plots.items()})


def report_stage(cfg: Config) -> str:
    out = build_report(cfg)
    return f"{out['table']}\nreport: {out['report']}"
