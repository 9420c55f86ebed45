"""Ray side of data collection: simulated users against policy replicas.

- :mod:`rollout.driver`: ``run_rollout`` (one episode per (user, seed) → Parquet) and the
  ``ulrec rollout`` stage, ``rollout_stage``.
- :mod:`rollout.replica`: ``PolicyReplica``, one engine + grounder batching many shards' prompts.
- :mod:`rollout.shard`: ``UserShard``, batched envs over a slice of the episodes; ``Lane``, the
  step logic.
- :mod:`rollout.episode`: per-episode state, the Parquet row schema ``EPISODE_SCHEMA``, summary.
- ``init_ray(cfg)`` lives in :mod:`ulrec.ray_session` (shared with train/ and serve/).
- :mod:`rollout.evaluate`: ``ulrec eval`` on top of ``run_rollout``.
"""
