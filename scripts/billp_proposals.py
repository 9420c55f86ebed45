"""How diverse BiLLP's actor proposals are where its episodes end (a diagnostic, not a stage).

    python scripts/billp_proposals.py --config configs/smollm2.yaml --reason repeat --steps 60

Reads an evaluated run's BiLLP episodes (``eval/billp``) and memory, takes the exit steps of
episodes that ended with ``--reason`` (sampling seed ``--seed``), and replays them through the same
planner and actor prompts with the same derived seeds: how many distinct items the
``billp.candidates`` proposals hold, and how often every proposal is an item the user already
received (then the critic has nothing better to pick). Runs the policy in this process.
"""

from __future__ import annotations

import argparse
import collections
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", "-c", required=True)
    parser.add_argument("--reason", default="repeat", help="exit reason of the episodes to replay")
    parser.add_argument("--steps", type=int, default=60, help="exit steps to replay")
    parser.add_argument("--seed", type=int, default=0, help="the episodes' sampling seed")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    import pyarrow.parquet as pq

    from rollout.evaluate import BILLP_MEMORY_FILE
    from ulrec.config import load_config
    from ulrec.data import load_prepared
    from ulrec.episodes import END_REASONS
    from ulrec.errors import UlrecError
    from ulrec.grounding import Grounder
    from ulrec.policy import make_policy, resolve_model_dir
    from ulrec.policy.billp import (actor_prompt, candidate_seed, catalogue_item, history_key, load_memory, parse_transcript,
                                    planner_prompt)
    from ulrec.prompts import parse_action

    try:
        cfg = load_config(args.config, args.overrides)
        if args.reason not in END_REASONS:
            raise UlrecError(f"--reason must be one of {', '.join(END_REASONS)}")
        method_dir = cfg.layout.eval / "billp"
        if not (method_dir / BILLP_MEMORY_FILE).is_file():
            raise UlrecError(f"no BiLLP evaluation at {method_dir} (run `ulrec eval` with billp in eval.methods)")
        titles = load_prepared(cfg.run_dir).titles
        memory = load_memory(method_dir / BILLP_MEMORY_FILE)
        episodes = pq.read_table(method_dir / "episodes").to_pylist()
    except UlrecError as exc:
        print(f"billp_proposals: error: {exc}", file=sys.stderr)
        return 1
    exits = [s for e in episodes if e["seed"] == args.seed and e["exit_reason"] == args.reason
             for s in e["steps"] if s["reason"] == args.reason][: args.steps]
    if not exits:
        print(f"no {args.reason} exits with seed {args.seed}")
        return 0
    grounder = Grounder.from_config(cfg.grounding, titles)
    emb = grounder.catalogue_embeddings()
    policy = make_policy(cfg.policy, resolve_model_dir(cfg), titles=titles)
    b, k = cfg.billp, cfg.billp.candidates

    parsed = [parse_transcript(s["prompt"]) for s in exits]
    guidance = [memory.retrieve(history_key([catalogue_item(grounder, t) for t in p.history], emb), b.reflections) for p in parsed]
    seeds = list(range(len(parsed)))  # fresh seeds: how diverse proposals are, not the episodes' exact draw
    plans = [None] * len(parsed)
    if b.plan_tokens > 0:
        plans = [o.text for o in policy.generate([planner_prompt(p, g) for p, g in zip(parsed, guidance)],
                                                 seeds=seeds, temperature=cfg.eval.temperature,
                                                 max_tokens=b.plan_tokens)]
    proposals = policy.generate([actor_prompt(p, g, pl) for p, g, pl in zip(parsed, guidance, plans) for _ in range(k)],
                                seeds=[candidate_seed(s, j) for s in seeds for j in range(k)],
                                temperature=cfg.eval.temperature)
    grounded = grounder.ground([parse_action(o.text) for o in proposals])
    distinct, all_received = collections.Counter(), 0
    for i, p in enumerate(parsed):
        received = {catalogue_item(grounder, s.title) for s in p.steps}
        items = [grounded[i * k + j].item_id for j in range(k)]
        distinct[len(set(items))] += 1
        all_received += all(x in received for x in items)
    policy.close()
    print(f"{len(parsed)} {args.reason} exit steps (at steps {dict(collections.Counter(s['step'] for s in exits))}); "
          f"distinct items among {k} proposals: {dict(sorted(distinct.items()))}; "
          f"every proposal already received: {all_received}; empty plans: {sum(not (pl or '').strip() for pl in plans)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
