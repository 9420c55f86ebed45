"""RL baselines of the paper's Table 1 on RLlib's new API stack (RLModule + Learner + Algorithm).

RLlib 2.60 ships DQN only among them; A2C, DORL, discrete CQL, BCQ, CRR and SQN are custom
algorithms here, all sharing one item-embedding module family (:mod:`train.baselines.module`).

- :func:`train.baselines.run.baselines_stage` — the ``ulrec baselines`` stage.
- :func:`train.baselines.algos.build_config` — the RLlib AlgorithmConfig of one baseline.
- :func:`train.baselines.evaluate.run_episodes` — play a trained module on the batched env.
"""
