"""Multi-node behaviour on one machine (``ray.cluster_utils.Cluster``): nodes shaped like
cluster.yaml's node types — a head, GPU nodes offering ``policy_gpu`` (GPUs declared, not real:
Ray only schedules by them) and a CPU node — with Serve replicas and rollout actors placed by the
resources they ask for, and a worker node removed in the middle of a rollout."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from _rollout_helpers import fake_sources, register_by_value, rollout_config
from _serve_helpers import TITLES, build_tiny_model
from rollout.driver import collect_episodes, episode_specs
from rollout.episode import EpisodeLabels
from serve.app import APP_NAME, build_app
from ulrec.config import load_config

pytestmark = pytest.mark.slow

NODE_MEMORY = 100 * 1024**2  # object store per node


def add_gpu_node(c: Cluster):
    return c.add_node(num_cpus=1, num_gpus=1, resources={"policy_gpu": 1}, object_store_memory=NODE_MEMORY)


def add_cpu_node(c: Cluster):
    return c.add_node(num_cpus=2, resources={"rollout_cpu": 4}, object_store_memory=NODE_MEMORY)


@pytest.fixture
def cluster():
    """A head with no CPUs for tasks (as in cluster.yaml), two GPU nodes, one CPU node; a fresh one
    per test, because a test that removes a node (or leaves Serve actors behind) changes what the
    next one can place (a shared cluster once left a replica unplaceable for 180 s)."""
    register_by_value()
    # conftest hides GPUs (CUDA_VISIBLE_DEVICES=""), and Ray refuses to declare GPUs then; the
    # declared GPUs are never used (no CUDA here: torch stays on the CPU).
    hidden = os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": NODE_MEMORY})
    add_gpu_node(c)
    add_gpu_node(c)
    add_cpu_node(c)
    c.wait_for_nodes()
    ray.init(address=c.address)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if hidden is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = hidden


def gpu_node_ids() -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("policy_gpu")}


def node_of(actor) -> str:
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))


def test_serve_replicas_spread_over_policy_nodes(cluster, tmp_path: Path):
    model_dir = build_tiny_model(tmp_path / "model", TITLES)
    items = tmp_path / "items.parquet"
    pd.DataFrame({"item_id": range(len(TITLES)), "title": TITLES}).to_parquet(items)
    cfg = load_config(None, [
        "policy.backend=hf", f"serve.checkpoint={model_dir}", f"serve.catalogue={items}",
        "serve.num_replicas=2", "serve.replica_num_cpus=0.5", "serve.replica_resources.policy_gpu=1",
    ])
    serve.start(proxy_location="Disabled")
    try:
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
        policy = serve.get_deployment_handle("ULRecPolicy", app_name=APP_NAME)
        nodes = set()
        for _ in range(60):  # requests go to either replica: ask until both answered
            nodes.add(policy.stats.remote().result()["node_id"])
            if len(nodes) == 2:
                break
        assert len(nodes) == 2 and nodes <= gpu_node_ids()  # one replica per policy_gpu node
    finally:
        serve.shutdown()


LABELS = EpisodeLabels(run="t", policy="fake", split="train")


def nodes_with(resource: str) -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(resource)}


def test_each_kind_of_work_lands_on_the_node_type_it_asks_for(cluster: Cluster, tmp_path: Path):
    """Replicas, shards and Ray Train workers ask only for CPUs plus a node-type resource (no GPU
    requests), and still land on policy_gpu, cpu_worker and trainer_gpu nodes respectively."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from train.stages import worker_resources
    from ulrec.config import TrainScaling

    cluster.add_node(num_cpus=2, resources={"trainer_gpu": 2}, object_store_memory=NODE_MEMORY)
    cluster.wait_for_nodes()
    cfg = rollout_config(tmp_path, num_replicas=2, replica_num_cpus=0.5, replica_resources={"policy_gpu": 1},
                         num_shards=2, shard_num_cpus=0.25, shard_resources={"rollout_cpu": 1})
    seen: dict[str, set[str]] = {"replicas": set(), "shards": set()}

    def record(progress) -> None:
        if not seen["replicas"]:
            seen["replicas"] = {node_of(r) for r in progress.replicas}
            seen["shards"] = {node_of(s) for s in progress.shards}

    collect_episodes(cfg, fake_sources(8, 8), user_ids=list(range(8)), seeds=[0], temperature=1.0,
                     out_dir=tmp_path / "episodes", labels=LABELS, on_report=record)
    assert len(seen["replicas"]) == 2 and seen["replicas"] <= nodes_with("policy_gpu")
    assert seen["shards"] and seen["shards"] <= nodes_with("rollout_cpu")

    marks = tmp_path / "train_nodes"
    marks.mkdir()

    def loop(config):
        node = ray.get_runtime_context().get_node_id()
        (Path(config["dir"]) / f"{ray.train.get_context().get_world_rank()}").write_text(node)

    scaling = TrainScaling(num_workers=2, cpus_per_worker=0.5, resources_per_worker={"trainer_gpu": 1})
    TorchTrainer(loop, train_loop_config={"dir": str(marks)},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker=worker_resources(scaling)),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray_train"), name="placement")).fit()
    train_nodes = {p.read_text() for p in marks.iterdir()}
    assert len(list(marks.iterdir())) == 2 and train_nodes <= nodes_with("trainer_gpu")


@pytest.mark.parametrize("victim", ["replica", "shard"])
def test_rollout_survives_losing_a_worker_node(cluster: Cluster, tmp_path: Path, victim: str):
    """Replicas ask for a GPU and a whole CPU, so they fill the GPU nodes and the shards go to the
    CPU node. Mid-rollout the node of one replica (or of the shards) is removed and a fresh node
    of its type joins, as the autoscaler would do; Ray restarts the lost actors there, and every
    episode is written exactly once."""
    # A hang (actors that cannot be placed) fails within the test's time instead.
    cfg = rollout_config(tmp_path, num_replicas=2, replica_num_gpus=1.0, replica_num_cpus=1.0, num_shards=2,
                         max_restarts=3, start_timeout_s=180)
    # Slow generation (1 s a batch): the rollout is still running when the node goes, whatever
    # the machine's load.
    sources = fake_sources(40, 8, delay_s=1.0)
    users, seeds = list(range(40)), [0]
    gpu_ids = gpu_node_ids()
    state: dict = {"removed": None}

    def remove_node(progress) -> None:
        if state["removed"] is not None or progress.done < 1:
            return
        replica_nodes = [node_of(r) for r in progress.replicas]
        shard_nodes = [node_of(s) for s in progress.shards]
        assert len(set(replica_nodes)) == 2 and set(replica_nodes) <= gpu_ids  # spread by resources
        assert not set(shard_nodes) & gpu_ids
        if victim == "replica":
            target = replica_nodes[0]
        else:  # the node of a shard that still has episodes to play, so it must be restarted
            owing = [i for i, remaining in enumerate(progress.remaining) if remaining]
            if not owing:
                return
            target = shard_nodes[owing[0]]
        state["removed"] = progress.done
        node = next(n for n in cluster.list_all_nodes() if n.node_id == target)
        cluster.remove_node(node, allow_graceful=False)
        (add_gpu_node if victim == "replica" else add_cpu_node)(cluster)

    summary = collect_episodes(cfg, sources, user_ids=users, seeds=seeds, temperature=1.0,
                               out_dir=tmp_path / "episodes", labels=LABELS, on_report=remove_node)
    assert state["removed"] is not None and state["removed"] < 40  # removed mid-run
    table = pq.read_table(tmp_path / "episodes")
    keys = list(zip(table.column("user_id").to_pylist(), table.column("seed").to_pylist()))
    expected = {(u, s) for u, s, _ in episode_specs(users, seeds, sources.histories, cfg.policy.history_length)}
    assert len(keys) == len(set(keys)) and set(keys) == expected
    assert summary["episodes"] == 40
    if victim == "shard":
        assert summary["restarts"] >= 1
