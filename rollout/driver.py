"""The rollout driver: policy replicas + user shards on Ray, episodes streamed into Parquet.

``run_rollout`` plays one episode per (user, seed): it starts ``rollout.num_replicas`` policy
replicas and ``rollout.num_shards`` user shards (placed by their Ray resources, so the same code
spreads over a multi-node GPU cluster), hands each shard a slice of the episodes and consumes the
shards' streams of finished episodes. Each block is de-duplicated by (user, seed), counted, and
appended to the Parquet dataset in a temporary directory that is renamed to ``out_dir`` at the end.
The result reads back as a Ray Dataset (:func:`read_episodes_dataset`).

Failures: a replica that dies is restarted by Ray (``max_restarts``) and the shards retry their
requests (per-request sampling seeds make the retry sample the same way), so its users' episodes
resume. A shard that dies is restarted too and the driver resends the episodes it had not
finished yet, which are redone from their first step; the de-duplication keeps each (user, seed)
exactly once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.exceptions import RayActorError, RayTaskError

from rollout.episode import EpisodeLabels, RolloutSummary
from ulrec.ray_session import init_ray, wait_until_alive
from rollout.engines import active_pool, make_room
from rollout.replica import ModelRef, PolicyReplica, TitleGrounder
from rollout.shard import EpisodeSpec, ShardReport, UserShard
from ulrec.checks import check_model_dir
from ulrec.config import Config
from ulrec.console import progress_bar
from ulrec.errors import DataError, InputError, UlrecError
from ulrec.io import atomic_path
from ulrec.policy import Policy, make_policy, resolve_model_dir
from ulrec.prompts import PromptBuilder
from ulrec.data import prepared_data
from ulrec.resume import StageInputs, path_fingerprint, run_stage
from ulrec.simulator.env import EchoChamberEnv
from ulrec.simulator.fit import simulator_fingerprint

# The collector model and the train simulator by content, the prepared data by its resume key.
ROLLOUT_STAGE = StageInputs(
    "training rollouts", ("env", "policy", "grounding", "rollout"),
    lambda cfg, model_dir: {"data": prepared_data(cfg.run_dir), "model": Path(model_dir),
                            "simulator": simulator_fingerprint(cfg, cfg.rollout.split),
                            **({"billp": cfg.billp.model_dump()} if cfg.rollout.collector.planner == "billp" else {})},
)


def replay_rollout_stage(name: str) -> StageInputs:
    """A tuned model replaying the training users on the train simulator (later rounds, on-policy
    rows): the model by content, the users, and the simulator that answers; the temperature is in
    the rollout section of the config the rollout runs with."""
    return StageInputs(
        name, ("rollout", "env", "policy", "grounding"),
        lambda cfg, model_dir, users: {"model": Path(model_dir), "users": list(users),
                                       "simulator": simulator_fingerprint(cfg, "train")},
    )


@dataclass(frozen=True)
class RolloutSources:
    """Where a rollout's pieces come from. Factories run inside the actors (so a restarted actor
    rebuilds its engine or env) and must be picklable.

    policy_factory(titles) -> Policy, grounder_factory(titles) -> grounder, env_factory() -> env.
    ``model_dir`` is the directory policy_factory loads; ``engine_key`` names everything else a
    replica is built from, so replicas kept from an earlier rollout with the same key can serve this
    one after switching to ``model_dir`` (None: never reused, e.g. a wrapped planner).
    """

    titles: list[str]
    histories: Mapping[int, Sequence[int]]
    policy_factory: Callable[[list[str]], Policy]
    grounder_factory: Callable[[list[str]], TitleGrounder]
    env_factory: Callable[[], EchoChamberEnv]
    model_dir: str | None = None
    engine_key: str | None = None


@dataclass(frozen=True)
class BiLLPSetup:
    """What a replica needs to run the BiLLP planner: its memory (built from the training rollouts)
    and the ``billp`` and ``grounding`` config sections (its grounder is the critic's embedder)."""

    memory: Any
    billp_cfg: Any
    grounding_cfg: Any


def build_billp_setup(cfg: Config, rollouts: Path, memory_file: Path):
    """The BiLLP planner's setup with its memory built from the episodes at ``rollouts`` (saved to
    ``memory_file``)."""
    from ulrec.data import load_prepared
    from ulrec.grounding import Grounder
    from ulrec.policy.billp import build_memory, save_memory

    if not rollouts.is_dir():
        raise UlrecError(f"billp: no training rollouts at {rollouts} (run `ulrec rollout` first)")
    episodes = pq.read_table(rollouts).to_pylist()
    grounder = Grounder.from_config(cfg.grounding, load_prepared(cfg.run_dir).titles)
    memory = build_memory(episodes, grounder, cfg.billp.critic_window)
    memory_file.parent.mkdir(parents=True, exist_ok=True)
    save_memory(memory, memory_file)
    return BiLLPSetup(memory=memory, billp_cfg=cfg.billp, grounding_cfg=cfg.grounding)


def _policy_factory(policy_cfg, model_dir: str, titles: list[str], collector=None,
                    billp: BiLLPSetup | None = None) -> Policy:
    """The policy engine; a ReAct collector (``rollout.collector.prompt_style: react``) or the
    BiLLP planner (``billp``) wraps it (on the sync engine: they chain generate calls)."""
    react = collector is not None and collector.prompt_style == "react"
    engine = "sync" if billp is not None or react else policy_cfg.engine
    policy = make_policy(policy_cfg, model_dir, titles=titles, engine=engine)
    if billp is not None:
        from ulrec.grounding import Grounder
        from ulrec.policy.billp import BiLLPPolicy

        b = billp.billp_cfg
        return BiLLPPolicy(policy, billp.memory, Grounder.from_config(billp.grounding_cfg, titles),
                           reflections=b.reflections, candidates=b.candidates, critic_window=b.critic_window,
                           # constrained decoding can only write actions, not a plan line
                           plan_tokens=0 if policy_cfg.constrained else b.plan_tokens)
    if react:
        from ulrec.policy.react import ReActPolicy

        return ReActPolicy(policy, collector.max_thought_tokens)
    return policy


def _grounder_factory(grounding_cfg, titles: list[str]) -> TitleGrounder:
    from ulrec.grounding import Grounder

    return Grounder.from_config(grounding_cfg, titles)


def _env_factory(cfg: Config, split: str, max_steps: int) -> EchoChamberEnv:
    from ulrec.simulator.fit import load_env

    return load_env(cfg, split, max_steps=max_steps)


def run_sources(cfg: Config, *, model_dir: str, split: str, max_steps: int, collector=None,
                billp: BiLLPSetup | None = None) -> RolloutSources:
    """The real pieces: prepared data, the saved simulator of ``split``, the policy at ``model_dir``."""
    from ulrec.data import load_prepared
    from ulrec.simulator.fit import env_config_for, simulator_path
    from ulrec.simulator.user_models import META_FILE

    # Before any actor starts: a bad directory is one line here, not a dead replica later.
    check_model_dir(model_dir, "policy model directory")
    # Checked here so that a missing input is a one-line error, not an actor's failed start.
    if not (simulator_path(cfg, split) / META_FILE).is_file():
        raise DataError(f"{simulator_path(cfg, split)}: no saved simulator (run `ulrec env fit` first)")
    env_config_for(cfg, split, max_steps=max_steps)
    data = load_prepared(cfg.run_dir)
    return RolloutSources(
        titles=data.titles,
        histories=data.user_histories(split, max_len=cfg.policy.history_length),
        policy_factory=partial(_policy_factory, cfg.policy, str(model_dir), collector=collector, billp=billp),
        grounder_factory=partial(_grounder_factory, cfg.grounding),
        env_factory=partial(_env_factory, cfg, split, max_steps),
        model_dir=str(model_dir),
        engine_key=None if wraps_engine(collector, billp is not None) else engine_key(cfg, data.titles),
    )


def wraps_engine(collector, billp: bool) -> bool:
    """Whether the replica's policy wraps its engine (BiLLP, the ReAct collector): such replicas
    are never kept for another rollout."""
    return billp or (collector is not None and collector.prompt_style == "react")


def engine_key(cfg: Config, titles: list[str]) -> str:
    """What a plain replica is built from apart from its model: the policy and grounding settings,
    the catalogue, and the replicas' own options."""
    import hashlib
    import json

    ro = cfg.rollout
    parts = {
        "policy": cfg.policy.model_dump(mode="json", exclude={"model"}),
        "grounding": cfg.grounding.model_dump(mode="json"),
        "titles": hashlib.sha256("\n".join(titles).encode()).hexdigest(),
        "replicas": [ro.num_replicas, ro.replica_num_cpus, ro.replica_num_gpus, dict(ro.replica_resources),
                     ro.max_restarts, ro.max_batch_size],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def run_rollout(
    cfg: Config,
    *,
    model_dir: str,
    split: str,
    user_ids: list[int],
    seeds: list[int],
    temperature: float,
    max_steps: int,
    out_dir: Path,
    policy_name: str,
    collector=None,
    billp: BiLLPSetup | None = None,
) -> dict[str, Any]:
    """Play one episode per (user, seed) with the policy at ``model_dir`` on ``split``'s
    simulator and write them to ``out_dir`` as Parquet (one row per episode). Returns the summary
    (episodes, mean length and reward, exit-reason and grounding shares, tokens, tokens/s, times).
    ``collector`` (``cfg.rollout.collector``) makes it a ReAct collector when its style says so;
    ``billp`` makes the policy the BiLLP planner on that model.
    """
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test' (got {split!r})")
    if max_steps < 1:
        raise InputError(f"max_steps must be >= 1 (got {max_steps})")
    if collector is not None and collector.prompt_style == "react" and cfg.policy.constrained:
        raise InputError("rollout.collector.prompt_style=react needs policy.constrained=false (thoughts are free text)")
    sources = run_sources(cfg, model_dir=model_dir, split=split, max_steps=max_steps, collector=collector,
                          billp=billp)
    return collect_episodes(
        cfg,
        sources,
        user_ids=user_ids,
        seeds=seeds,
        temperature=temperature,
        out_dir=Path(out_dir),
        labels=EpisodeLabels(run=cfg.run.name, policy=policy_name, split=split),
    )


def episode_specs(
    user_ids: Sequence[int], seeds: Sequence[int], histories: Mapping[int, Sequence[int]], history_length: int
) -> list[EpisodeSpec]:
    """One spec per (user, seed), users outermost; InputError for duplicates or unknown users."""
    if not user_ids:
        raise InputError("user_ids is empty")
    if not seeds:
        raise InputError("seeds is empty")
    for name, values in (("user_ids", user_ids), ("seeds", seeds)):
        if len(set(values)) != len(values):
            raise InputError(f"{name} holds duplicates")
    unknown = [u for u in user_ids if u not in histories]
    if unknown:
        raise InputError(f"user_ids: user {unknown[0]} has no history in this split ({len(unknown)} such users)")
    return [
        (int(u), int(s), tuple(int(i) for i in histories[u][-history_length:])) for u in user_ids for s in seeds
    ]


def collect_episodes(
    cfg: Config,
    sources: RolloutSources,
    *,
    user_ids: list[int],
    seeds: list[int],
    temperature: float,
    out_dir: Path,
    labels: EpisodeLabels,
    on_report: Callable[["RolloutProgress"], None] | None = None,
) -> dict[str, Any]:
    """Run the actors and write the episodes; see :func:`run_rollout`.

    ``on_report`` is called after every shard report (tests use it to kill actors mid-run).
    """
    if temperature < 0:
        raise InputError(f"temperature must be >= 0 (got {temperature})")
    specs = episode_specs(user_ids, seeds, sources.histories, cfg.policy.history_length)
    started = time.perf_counter()
    init_ray(cfg)
    ro = cfg.rollout
    titles_ref = ray.put(sources.titles)
    model = ModelRef(sources.model_dir, path_fingerprint(sources.model_dir)) if sources.model_dir else None

    def start_replicas() -> list:
        return [
            PolicyReplica.options(
                num_cpus=ro.replica_num_cpus,
                num_gpus=ro.replica_num_gpus,
                resources=dict(ro.replica_resources),
                max_restarts=ro.max_restarts,
                max_task_retries=0,
                scheduling_strategy="SPREAD",
            ).remote(sources.policy_factory, sources.grounder_factory, titles_ref, ro.max_batch_size, model)
            for _ in range(ro.num_replicas)
        ]

    demand = {"CPU": ro.replica_num_cpus * ro.num_replicas, "GPU": ro.replica_num_gpus * ro.num_replicas,
              **{k: v * ro.num_replicas for k, v in ro.replica_resources.items()}}
    pool = active_pool() if sources.engine_key and model else None
    if pool is not None:
        replicas, engines = pool.replicas_for(sources.engine_key, model, demand, start_replicas, ro.start_timeout_s,
                                              pinned=titles_ref)
    else:
        # Replicas of its own (a wrapped planner, say): kept ones give way if both cannot be placed.
        make_room({**demand, "CPU": demand["CPU"] + ro.shard_num_cpus * min(ro.num_shards, len(specs))},
                  f"{labels.policy}'s own replicas")
        replicas, engines = start_replicas(), "started"
    num_shards = min(ro.num_shards, len(specs))
    shards = [
        UserShard.options(
            num_cpus=ro.shard_num_cpus, resources=dict(ro.shard_resources), max_restarts=ro.max_restarts,
            max_task_retries=0, scheduling_strategy="SPREAD",
        ).remote(
            sources.env_factory,
            PromptBuilder.from_config(cfg.policy),
            titles_ref,
            labels,
            replicas,
            temperature=temperature,
            lane_size=ro.lane_size,
            flush_episodes=ro.flush_episodes,
            flush_s=ro.flush_s,
            request_attempts=(ro.max_restarts + 1) * ro.num_replicas + 1,
            retry_backoff_s=ro.retry_backoff_s,
            model=model,
            lane_affinity=ro.lane_affinity,
        )
        for _ in range(num_shards)
    ]
    kept = False
    try:
        _wait_for_actors(replicas, shards, ro)
        ready = time.perf_counter()
        progress = RolloutProgress(specs, shards, replicas, show=cfg.run.progress, on_report=on_report)
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            writer = _PartWriter(tmp, ro.episodes_per_file)
            progress.run(writer.add)
            writer.close()
        finished = time.perf_counter()
        replica_stats = _replica_stats(replicas)
        kept = pool is not None
    finally:
        for actor in shards + ([] if kept else replicas):
            ray.kill(actor, no_restart=True)
        if pool is not None and not kept:
            pool.close()  # a failed rollout leaves no replica behind
    summary = progress.summary.as_dict(finished - ready)
    summary.update(
        startup_s=ready - started,
        total_wall_s=finished - started,
        restarts=progress.restarts,
        engines=engines,
        replica_stats=replica_stats,
        out_dir=str(out_dir),
        policy=labels.policy,
        split=labels.split,
    )
    return summary


def _replica_stats(replicas: list) -> list[dict | None]:
    """Each replica's counters (``PolicyReplica.stats``; None for one that does not answer)."""
    out = []
    for replica in replicas:
        try:
            out.append(ray.get(replica.stats.remote(), timeout=10))
        except (RayActorError, ray.exceptions.GetTimeoutError):
            out.append(None)
    return out


def _wait_for_actors(replicas: list, shards: list, ro) -> None:
    """Block until every actor started; a clear error when they cannot be placed in time."""
    from ray.exceptions import GetTimeoutError

    try:
        ray.get([r.ready.remote() for r in replicas] + [s.ready.remote() for s in shards], timeout=ro.start_timeout_s)
    except GetTimeoutError:
        raise UlrecError(
            f"rollout actors did not start within rollout.start_timeout_s={ro.start_timeout_s:g} s: "
            f"{len(replicas)} replica(s) need {ro.replica_num_cpus:g} CPU + {ro.replica_num_gpus:g} GPU each, "
            f"{len(shards)} shard(s) {ro.shard_num_cpus:g} CPU each; the cluster has {ray.cluster_resources()}"
        ) from None


class RolloutProgress:
    """Consumes the shards' report streams: de-duplicates, counts, shows progress, and resends a
    restarted shard's unfinished episodes."""

    def __init__(
        self,
        specs: list[EpisodeSpec],
        shards: list,
        replicas: list,
        *,
        show: bool,
        on_report: Callable[["RolloutProgress"], None] | None,
    ) -> None:
        self.shards = shards
        self.replicas = replicas  # not used here; on_report hooks may inspect them
        self.show = show
        self.on_report = on_report
        # Each shard's unfinished episodes by (user, seed); round-robin so shards get mixed users.
        self.remaining: list[dict[tuple[int, int], EpisodeSpec]] = [{} for _ in shards]
        for k, spec in enumerate(specs):
            self.remaining[k % len(shards)][(spec[0], spec[1])] = spec
        self.total = len(specs)
        self.summary = RolloutSummary()
        self.running = [len(r) for r in self.remaining]
        self.restarts = 0
        self.steps = 0

    @property
    def done(self) -> int:
        return self.summary.episodes

    def run(self, sink: Callable[[pa.Table], None]) -> None:
        streams = {i: self._start(i) for i in range(len(self.shards)) if self.remaining[i]}
        bar = progress_bar(total=self.total, desc="rollout", unit="ep", enabled=self.show, smoothing=0.1)
        begun = time.perf_counter()
        try:
            while streams:
                ready, _ = ray.wait(list(streams.values()), num_returns=1)
                shard = next(i for i, s in streams.items() if s is ready[0])
                try:
                    report: ShardReport = ray.get(next(streams[shard]))
                except StopIteration:
                    del streams[shard]
                    if self.remaining[shard]:
                        unplayed = len(self.remaining[shard])
                        raise UlrecError(f"rollout shard {shard} ended with {unplayed} episodes unplayed")
                    continue
                except RayTaskError as exc:
                    # Raised inside run() (also a replica that stayed down): not a shard death.
                    # A bad input becomes the user's one-line error, not a traceback.
                    if isinstance(exc.cause, UlrecError):
                        raise exc.cause from None
                    raise
                except RayActorError:
                    streams[shard] = self._restart(shard)
                    continue
                fresh = self._accept(shard, report)
                if fresh.num_rows:
                    sink(fresh)
                bar.update(fresh.num_rows)
                elapsed = max(time.perf_counter() - begun, 1e-9)
                bar.set_postfix(
                    live=sum(self.running),
                    steps_s=f"{self.steps / elapsed:.0f}",
                    mean_len=f"{self.summary.mean_length:.2f}",
                )
                if self.on_report is not None:
                    self.on_report(self)
        finally:
            bar.close()

    def _start(self, shard: int):
        return self.shards[shard].run.remote(list(self.remaining[shard].values()))

    def _restart(self, shard: int):
        self.restarts += 1
        # Ray restarts the actor (ActorDiedError here means it is gone for good); unfinished
        # episodes start over on it.
        wait_until_alive(self.shards[shard])
        self.running[shard] = len(self.remaining[shard])
        return self._start(shard)

    def _accept(self, shard: int, report: ShardReport) -> pa.Table:
        """The report's episodes that this shard still owed (first delivery only)."""
        self.running[shard] = report.running
        self.steps += report.steps
        table = report.episodes
        if table.num_rows == 0:
            return table
        owed = self.remaining[shard]
        keys = list(zip(table.column("user_id").to_pylist(), table.column("seed").to_pylist()))
        keep = [owed.pop(k, None) is not None for k in keys]
        if not all(keep):
            table = table.filter(pa.array(keep))
        self.summary.add(table)
        return table


class _PartWriter:
    """Appends episode blocks to Parquet part files of about ``rows_per_file`` rows each."""

    def __init__(self, directory: Path, rows_per_file: int) -> None:
        self.directory = directory
        self.rows_per_file = rows_per_file
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.files = 0

    def add(self, table: pa.Table) -> None:
        self.buffer.append(table)
        self.buffered += table.num_rows
        if self.buffered >= self.rows_per_file:
            self._flush()

    def _flush(self) -> None:
        if not self.buffered:
            return
        pq.write_table(pa.concat_tables(self.buffer), self.directory / f"part-{self.files:05d}.parquet")
        self.files += 1
        self.buffer, self.buffered = [], 0

    def close(self) -> None:
        self._flush()


def read_episodes_dataset(out_dir: str | Path) -> "ray.data.Dataset":
    """The episodes written by a rollout as a Ray Dataset (one row per episode)."""
    return ray.data.read_parquet(str(out_dir), file_extensions=["parquet"])


# ------------------------------------------------------------------------------------- CLI stage
def collector_model_dir(cfg: Config) -> Path:
    """The model that collects the training rollouts: ``rollout.collector.model`` or the base model."""
    if cfg.rollout.collector.model:
        return Path(cfg.rollout.collector.model).expanduser()
    return resolve_model_dir(cfg)


def training_rollout(cfg: Config, model_dir: Path, out_dir: Path, users: list[int], *, split: str = "train",
                     policy_name: str, collector=None, billp: BiLLPSetup | None = None) -> dict[str, Any]:
    """Training rollouts with the ``rollout`` section's settings (seeds, exploration temperature,
    horizon): the rollout stage's, and each iterative round's."""
    ro = cfg.rollout
    return run_rollout(
        cfg,
        model_dir=str(model_dir),
        split=split,
        user_ids=users,
        seeds=list(ro.seeds),
        temperature=ro.temperature,
        max_steps=ro.max_steps,
        out_dir=out_dir,
        policy_name=policy_name,
        collector=collector,
        billp=billp,
    )


# Where a planner-collector keeps the memory it was built with, beside the plain rollouts it came
# from ("_": Parquet readers skip it).
PLANNER_MEMORY_FILE = "_billp_memory.json"


def rollout_stage(cfg: Config) -> dict[str, Any]:
    """`ulrec rollout`: training rollouts on ``rollout.split`` into ``<run>/rollouts/<split>``."""
    from ulrec.evaluation import training_users
    from ulrec.tracking import stage_logger

    ro = cfg.rollout
    out_dir = cfg.layout.rollouts(ro.split)
    model_dir = collector_model_dir(cfg)
    if not model_dir.exists():
        what = "rollout.collector.model" if ro.collector.model else "policy model"
        raise UlrecError(f"no {what} at {model_dir} (run `ulrec model init`, or set policy.model / rollout.collector.model)")
    check_model_dir(model_dir, "rollout.collector.model" if ro.collector.model else "policy model directory")

    def build(_key: str) -> tuple[dict[str, Any], dict[str, Any]]:
        users = training_users(cfg)
        name = "collector" if ro.collector.model else model_dir.name
        billp, plain = None, None
        if ro.collector.planner == "billp":
            # The planner's memory needs episodes of these users first: the model plays them alone.
            plain_dir = cfg.layout.plain_rollouts(ro.split)
            plain = training_rollout(cfg, model_dir, plain_dir, users, split=ro.split, policy_name=name,
                                     collector=ro.collector)
            billp = build_billp_setup(cfg, plain_dir, plain_dir / PLANNER_MEMORY_FILE)
            name = f"billp+{name}"
        summary = training_rollout(cfg, model_dir, out_dir, users, split=ro.split, policy_name=name,
                                   collector=ro.collector, billp=billp)
        if plain is not None:
            summary["plain"] = {k: plain[k] for k in ("episodes", "mean_length", "mean_reward", "exit_reasons")}
        # Metrics live beside, not inside, the Parquet directory (readers glob it).
        with stage_logger(cfg, f"rollout-{ro.split}", cfg.layout.logs / f"rollout-{ro.split}") as logger:
            flat = {k: v for k, v in summary.items() if isinstance(v, (int, float, str))}
            flat.update({f"exit_{k}": v for k, v in summary["exit_reasons"].items()})
            flat.update({f"grounding_{k}": v for k, v in summary["grounding"].items()})
            logger.log(flat)
            logger.summary(flat)
        return summary, {"summary": summary}

    return run_stage(ROLLOUT_STAGE, cfg, out_dir, build,
                     skipped=lambda marker: {"skipped": True, **marker.get("summary", {})}, model_dir=model_dir)
