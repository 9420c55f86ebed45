"""Generated tokens per second of the two policy backends on the same prompts and settings.

    python benchmarks/policy_backends.py [--config configs/quickstart.yaml] [--prompts 256] [overrides...]

Uses the run's base model (``ulrec model init`` first) or ``policy.model``; prompts are built by
the shared PromptBuilder from users' training histories. Prints tokens/s for hf and vllm, their
ratio, and the vLLM constrained-decoding cost; everything is measured in this one run.
"""

from __future__ import annotations

import argparse
import random
import time

from ulrec.runtime_env import apply_defaults  # noqa: E402

apply_defaults()


def _timed(policy, prompts, seeds):
    policy.generate(prompts[:8], seeds=seeds[:8])  # warm up (first-call allocations)
    start = time.perf_counter()
    results = policy.generate(prompts, seeds=seeds)
    seconds = time.perf_counter() - start
    tokens = sum(r.num_tokens for r in results)
    return tokens / seconds, tokens, seconds


def main() -> None:
    from ulrec.config import load_config
    from ulrec.model_init import make_warm_start_examples, read_catalogue_and_histories
    from ulrec.policy import make_policy, resolve_model_dir
    from ulrec.prompts import PromptBuilder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    titles, histories = read_catalogue_and_histories(cfg.run_dir / "data")
    builder = PromptBuilder.from_config(cfg.policy)
    examples = make_warm_start_examples(histories, titles, builder, args.prompts, 3, random.Random(cfg.run.seed))
    prompts = [e.prompt for e in examples]
    seeds = list(range(len(prompts)))
    model_dir = resolve_model_dir(cfg)
    rows = {}
    for name, overrides in [("hf", {"backend": "hf"}), ("vllm", {"backend": "vllm"}),
                            ("vllm constrained", {"backend": "vllm", "constrained": True})]:
        pcfg = cfg.policy.model_copy(update=overrides)
        policy = make_policy(pcfg, model_dir, titles=titles)
        rows[name] = _timed(policy, prompts, seeds)
        policy.close()
        tps, tokens, seconds = rows[name]
        print(f"{name:>17}: {tps:8.0f} tok/s ({tokens} tokens in {seconds:.1f} s, {len(prompts)} prompts)", flush=True)
    print(f"vllm / hf tokens/s: {rows['vllm'][0] / rows['hf'][0]:.2f}")
    print(f"vllm constrained / vllm tokens/s: {rows['vllm constrained'][0] / rows['vllm'][0]:.2f}")


if __name__ == "__main__":
    main()
