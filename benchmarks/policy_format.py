"""How often a policy's outputs parse and name a catalogue title, with and without the chat
template and with constrained decoding, on the same prompts and seeds.

    python benchmarks/policy_format.py --config configs/smollm2.yaml [--prompts 200] [overrides...]

Prompts come from the shared PromptBuilder on training users' histories (0–3 earlier accepted
steps, like the warm start), sampled at the config's rollout (exploration) and evaluation
temperatures. Needs `ulrec data prepare` and `ulrec model init` (or policy.model) first. Prints a
markdown table and writes it, with the numbers, to <run>/benchmarks/policy_format.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from ulrec.runtime_env import apply_defaults  # noqa: E402

apply_defaults()


def main() -> None:
    from ulrec.config import load_config
    from ulrec.io import write_json
    from ulrec.model_init import make_warm_start_examples, read_catalogue_and_histories, title_rates
    from ulrec.policy import make_policy, resolve_model_dir
    from ulrec.prompts import PromptBuilder, parse_action

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--max-steps", type=int, default=3, help="earlier accepted steps shown (0..this)")
    parser.add_argument("--settings", default="raw,chat,constrained", help="comma list of raw,chat,constrained")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    titles, histories = read_catalogue_and_histories(cfg.run_dir / "data")
    builder = PromptBuilder.from_config(cfg.policy)
    examples = make_warm_start_examples(histories, titles, builder, args.prompts, args.max_steps,
                                        random.Random(cfg.run.seed))
    prompts = [e.prompt for e in examples]
    seeds = list(range(len(prompts)))
    model_dir = resolve_model_dir(cfg)
    rows = []
    settings = {"raw": ("raw text", {"chat_template": "off"}), "chat": ("chat template", {"chat_template": "on"}),
                "constrained": ("chat template + constrained", {"chat_template": "on", "constrained": True})}
    for key in args.settings.split(","):
        name, changes = settings[key]
        policy_cfg = cfg.policy.model_copy(update=changes)
        policy = make_policy(policy_cfg, model_dir, titles=titles)
        try:
            for temperature in (cfg.rollout.temperature, cfg.eval.temperature):
                start = time.perf_counter()
                outputs = [r.text for r in policy.generate(prompts, seeds=seeds, temperature=temperature)]
                rates = title_rates(outputs, titles)
                empty = sum(not o.strip() for o in outputs) / len(outputs)
                rows.append({"setting": name, "temperature": temperature, "format_error_rate": 1 - rates["format_rate"],
                             "exact_title_rate": rates["exact_title_rate"], "empty_rate": empty,
                             "seconds": round(time.perf_counter() - start, 1),
                             "example": next((o for o in outputs if parse_action(o) is None), outputs[0])[:80]})
        finally:
            policy.close()
    lines = ["| setting | temperature | format errors | empty outputs | exact titles |", "|---|--:|--:|--:|--:|"]
    lines += [f"| {r['setting']} | {r['temperature']} | {r['format_error_rate']:.0%} | {r['empty_rate']:.0%} | "
              f"{r['exact_title_rate']:.0%} |" for r in rows]
    table = "\n".join(lines)
    print(f"model {model_dir}, {len(prompts)} prompts (0-{args.max_steps} earlier steps), "
          f"template {cfg.policy.template_file or 'default'}, backend {cfg.policy.backend}\n{table}")
    write_json(cfg.run_dir / "benchmarks" / "policy_format.json",
               {"model": str(model_dir), "prompts": len(prompts), "rows": rows, "table": table})


if __name__ == "__main__":
    main()
