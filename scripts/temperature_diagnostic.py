"""Base, ULRec-P and ULRec on the sweep's validation users at several sampling temperatures (a
diagnostic, not a stage; nothing is picked from it).

    python scripts/temperature_diagnostic.py --config configs/quickstart.yaml --temperatures 0.5,0.7,1.0 \
        run.name=qs-sweep

Needs a finished `ulrec sweep` in the run directory: ULRec-P is its stage-1 pick (the main
``checkpoints/sft`` when the sweep had no stage-1 grid), ULRec its pick. Every evaluation is on the
train simulator's validation users and cached under ``tdiag/T<temperature>/``; prints a markdown
table of Len, repeat exits and distinct items.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", "-c", required=True)
    parser.add_argument("--temperatures", default="0.5,1.0", help="comma-separated sampling temperatures")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from rollout.evaluate import evaluate_model
    from train.sweep import validation_users
    from ulrec.config import ConfigError, load_config
    from ulrec.errors import UlrecError

    try:
        try:
            temperatures = [float(t) for t in args.temperatures.split(",")]
        except ValueError:
            raise UlrecError(f"--temperatures must be comma-separated numbers, got {args.temperatures!r}") from None
        base_cfg = load_config(args.config, args.overrides)
        results_file = base_cfg.layout.sweep / "results.json"
        if not results_file.is_file():
            raise UlrecError(f"no sweep results at {results_file} (run `ulrec sweep` first)")
        sweep = json.loads(results_file.read_text())
        checkpoints = base_cfg.run_dir / "checkpoints"
        sft_name = (sweep.get("sft_pick") or {}).get("name", "sft")
        models = [("base", base_cfg.layout.base_model), ("ulrec-p", checkpoints / sft_name),
                  ("ulrec", checkpoints / sweep["pick"]["name"])]
        print("| T | method | validation Len | repeat exits | distinct items |\n|---|---|--:|--:|--:|")
        for temperature in temperatures:
            cfg = load_config(args.config, [*args.overrides, f"eval.temperature={temperature}"])
            users = validation_users(cfg)
            for method, model_dir in models:
                s = evaluate_model(cfg, method, Path(model_dir), users, split="train",
                                   out_root=cfg.run_dir / "tdiag" / f"T{temperature}")
                print(f"| {temperature} | {method} | {s['len_mean']:.2f} ± {s['len_std']:.2f} | "
                      f"{s['exit_shares'].get('repeat', 0):.0%} | {s['items']['distinct']} |", flush=True)
    except (UlrecError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
