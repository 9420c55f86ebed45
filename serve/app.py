"""The Ray Serve application: ``ulrec serve`` → :func:`serve_stage`.

Two deployments:

- ``ULRecIngress`` (FastAPI, :mod:`serve.api`): validation, auth, body limits, id ↔ title lookup,
  and the slow-client limits of :mod:`serve.limits` (shedding, per-client cap, deadlines).
  Light; ``serve.ingress_replicas`` copies. Serve's HTTP proxy in front of it gets its request
  timeout and keep-alive from the config (:func:`serve.limits.proxy_http_options`), and queues at
  most ``serve.ingress_max_queued_requests`` requests for it (then 503 with Retry-After).
- ``ULRecPolicy``: the model (``ulrec.policy``, vLLM or HF backend) and grounding. Concurrent
  requests' generate calls are merged by ``@serve.batch`` (``serve.max_batch_size``,
  ``serve.batch_wait_timeout_s``) into one ``policy.generate`` per batch and temperature, and
  their grounding calls into one embedder call per batch.
  ``serve.num_replicas`` copies, or autoscaling between ``serve.min_replicas`` and
  ``serve.max_replicas``; each needs ``serve.replica_num_cpus/gpus`` and any
  ``serve.replica_resources``, so on a cluster replicas land on the node types that offer them.

``build_app(cfg)`` returns the bound application (for tests and ``serve run``); the model directory
is ``serve.checkpoint`` or the run's ULRec checkpoint, the catalogue per :mod:`serve.catalogue`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import defaultdict
from pathlib import Path

import ray
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle

from serve.api import BackendUnavailable, create_api, resolve_token
from serve.catalogue import Catalogue, catalogue_path
from serve.limits import proxy_http_options
from serve.recommender import (
    GenerationRequest,
    Query,
    Recommendation,
    RecommendationError,
    Recommender,
    ThreadedGrounding,
)
from ulrec.checks import check_model_dir
from ulrec.config import Config, tensor_parallel_mismatch
from ulrec.console import say
from ulrec.errors import InputError
from ulrec.grounding import GroundResult
from ulrec.layout import STAGE2_CHECKPOINT
from ulrec.policy import GenerationResult

logger = logging.getLogger("ulrec.serve")

APP_NAME = "ulrec"
HEALTH_TIMEOUT_S = 5.0


def checkpoint_dir(cfg: Config) -> Path:
    """The model directory to serve: ``serve.checkpoint``, else ``<run>/checkpoints/kto``."""
    path = Path(cfg.serve.checkpoint).expanduser() if cfg.serve.checkpoint else cfg.layout.checkpoint(STAGE2_CHECKPOINT)
    if not path.exists():
        raise InputError(f"serve.checkpoint: {path} does not exist (run training first or pass --checkpoint)")
    # Before Serve starts: a bad directory is one line, not a replica that dies after 30 s.
    return check_model_dir(path, "serve.checkpoint")


def group_by_temperature(requests: list[GenerationRequest]) -> dict[float, list[int]]:
    """Positions of ``requests`` per temperature (one ``generate`` call per group)."""
    groups: dict[float, list[int]] = defaultdict(list)
    for i, req in enumerate(requests):
        groups[req.temperature].append(i)
    return dict(groups)


@serve.deployment(name="ULRecPolicy")
class PolicyDeployment:
    """One policy replica: model, grounding and the recommendation rules."""

    def __init__(self, cfg_dict: dict, model_dir: str, catalogue_file: str) -> None:
        from serve.grounding import ServeGrounder
        from ulrec.policy import make_policy
        from ulrec.prompts import PromptBuilder

        cfg = Config.model_validate(cfg_dict)
        titles = Catalogue.load(catalogue_file).titles
        self.policy = make_policy(cfg.policy, model_dir, titles=titles)
        self.grounding = ThreadedGrounding(ServeGrounder.from_config(cfg.grounding, titles))
        for batched in (self._generate_batch, self._ground_batch):
            batched.set_max_batch_size(cfg.serve.max_batch_size)
            batched.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)
        self.recommender = Recommender(
            titles,
            PromptBuilder.from_config(cfg.policy),
            generate=self._generate_many,
            ground=self._ground_many,
            nearest_allowed=self.grounding.nearest_allowed,
            default_temperature=cfg.policy.temperature,
            resample_rounds=cfg.serve.resample_rounds,
        )
        # Generate-batch counters (a list of sizes would grow for as long as the server runs).
        self.batch_stats = {"batches": 0, "prompts": 0, "max_batch": 0}
        # The last generate call's failure (cleared by a success): an engine that keeps failing
        # makes the replica unhealthy, so Serve replaces it.
        self.engine_error: Exception | None = None

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05)
    async def _generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        stats = self.batch_stats
        stats.update(batches=stats["batches"] + 1, prompts=stats["prompts"] + len(requests),
                     max_batch=max(stats["max_batch"], len(requests)))
        results: list[GenerationResult | None] = [None] * len(requests)
        try:
            for temperature, positions in group_by_temperature(requests).items():
                # In a thread: the event loop keeps accepting requests (the next batch) meanwhile.
                outs = await asyncio.to_thread(
                    self.policy.generate,
                    [requests[i].prompt for i in positions],
                    seeds=[requests[i].seed for i in positions],
                    temperature=temperature,
                )
                for i, out in zip(positions, outs):
                    results[i] = out
        except Exception as exc:
            self.engine_error = exc
            raise
        self.engine_error = None
        return results  # type: ignore[return-value]

    async def _generate_many(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return list(await asyncio.gather(*(self._generate_batch(r) for r in requests)))

    # One embedder call for every title of the requests that finished generating together.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05)
    async def _ground_batch(self, titles: list[str | None]) -> list[GroundResult]:
        return await self.grounding.ground(titles)

    async def _ground_many(self, titles: list[str | None]) -> list[GroundResult]:
        return list(await asyncio.gather(*(self._ground_batch(t) for t in titles)))

    async def recommend(self, query: Query) -> list[Recommendation] | dict:
        try:
            return await self.recommender.recommend(query)
        except RecommendationError as exc:
            # Returned, not raised: the ingress turns it into a 422 (exceptions crossing a handle
            # arrive wrapped).
            return {"field": exc.field, "message": exc.message}

    def stats(self) -> dict:
        """This replica's node and the generate-batch sizes seen so far (whether dynamic batching
        merges concurrent requests)."""
        return {"node_id": ray.get_runtime_context().get_node_id(), **self.batch_stats}

    def ping(self) -> bool:
        return self.engine_error is None

    def check_health(self) -> None:
        """Called by Serve periodically; raising marks the replica unhealthy (it is restarted)."""
        if self.engine_error is not None:
            raise RuntimeError(f"policy engine failing: {self.engine_error!r}")

    def __del__(self) -> None:
        policy = getattr(self, "policy", None)
        if policy is not None:
            policy.close()


class HandleBackend:
    """The ingress's backend: the policy deployment behind a handle."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

    async def recommend(self, query: Query) -> list[Recommendation]:
        try:
            result = await self.handle.recommend.remote(query)
        except Exception as exc:  # the replica failed (engine error, replica died): not the input's fault
            logger.exception("policy deployment failed a request")
            raise BackendUnavailable("the recommender is unavailable; retry later") from exc
        if isinstance(result, dict):
            raise RecommendationError(result["field"], result["message"])
        return result

    async def ready(self) -> bool:
        try:
            return bool(await asyncio.wait_for(self.handle.ping.remote(), HEALTH_TIMEOUT_S))
        except Exception:  # any failure to answer is "not ready", reported as 503 by /healthz
            logger.warning("policy deployment did not answer the health check", exc_info=True)
            return False


@serve.deployment(name="ULRecIngress")
@serve.ingress()
class Ingress:
    def __init__(self, policy: DeploymentHandle, catalogue_file: str, serve_dict: dict, token: str | None) -> None:
        self.policy = policy
        self.catalogue = Catalogue.load(catalogue_file)
        self.serve_cfg = Config.model_validate({"serve": serve_dict}).serve
        self.token = token

    def __serve_build_asgi_app__(self):
        from serve.metrics import ServeMetrics

        # Created here, inside the replica: Serve tags the metrics with its deployment and replica.
        return create_api(HandleBackend(self.policy), self.catalogue, self.serve_cfg, token=self.token,
                          metrics=ServeMetrics())


def _policy_options(cfg: Config) -> dict:
    s = cfg.serve
    if problem := tensor_parallel_mismatch(cfg.policy.tensor_parallel_size, "serve.replica_num_gpus",
                                           s.replica_num_gpus):
        raise InputError(problem)
    options: dict = {
        "max_ongoing_requests": s.max_ongoing_requests,
        "ray_actor_options": {
            "num_cpus": s.replica_num_cpus,
            "num_gpus": s.replica_num_gpus,
            **({"resources": dict(s.replica_resources)} if s.replica_resources else {}),
        },
    }
    if s.autoscaling:
        options["autoscaling_config"] = {
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = s.num_replicas
    return options


def _ingress_options(cfg: Config) -> dict:
    s = cfg.serve
    return {
        "num_replicas": s.ingress_replicas,
        "max_ongoing_requests": s.ingress_max_ongoing_requests,
        # Beyond this many requests queued at the proxy for a busy ingress, Serve answers 503 itself.
        "max_queued_requests": s.ingress_max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=s.retry_after_s),
        "ray_actor_options": {"num_cpus": s.ingress_num_cpus},
    }


def build_app(cfg: Config):
    """The bound Serve application for ``cfg`` (checkpoint and catalogue are checked here, so a
    bad path fails before any replica starts)."""
    model_dir = checkpoint_dir(cfg)
    catalogue_file = catalogue_path(cfg)
    Catalogue.load(catalogue_file)
    policy = PolicyDeployment.options(**_policy_options(cfg)).bind(
        cfg.model_dump(mode="json"), str(model_dir.resolve()), str(catalogue_file.resolve())
    )
    return Ingress.options(**_ingress_options(cfg)).bind(
        policy, str(catalogue_file.resolve()), cfg.serve.model_dump(mode="json"), resolve_token(cfg.serve)
    )


def builder_config(args: dict[str, str] | None) -> Config:
    """The config of :func:`app_builder`'s arguments: ``config`` (a YAML file), ``checkpoint`` (the
    model directory, as ``ulrec serve --checkpoint``) and any dotted override (``serve.num_replicas=2``)."""
    from ulrec.config import load_config

    args = dict(args or {})
    config = args.pop("config", None)
    checkpoint = args.pop("checkpoint", None)
    overrides = [f"{key}={value}" for key, value in args.items()]
    if checkpoint:
        overrides.append(f"serve.checkpoint={checkpoint}")
    return load_config(config, overrides)


def app_builder(args: dict[str, str]):
    """Serve's application builder, for ``serve run`` / ``serve build`` / ``serve deploy``::

        serve run serve.app:app_builder config=configs/quickstart.yaml checkpoint=runs/quickstart/checkpoints/kto

    The same application as ``ulrec serve``. The proxy's HTTP options (host, port, timeouts) belong
    to the Serve instance, so with ``serve run`` they come from its flags or the deployment YAML
    (``configs/serve/deployment.yaml``), not from ``serve.*`` of the config."""
    return build_app(builder_config(args))


def start(cfg: Config) -> DeploymentHandle:
    """Start Ray (per ``cfg.ray``) and Serve on ``serve.host:serve.port``; deploy; return the
    ingress handle once every replica is up."""
    from ulrec.ray_session import init_ray

    app = build_app(cfg)
    init_ray(cfg)
    serve.start(http_options=proxy_http_options(cfg.serve))
    return serve.run(app, name=APP_NAME, route_prefix="/")


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def serve_stage(cfg: Config) -> None:
    """``ulrec serve``: deploy and block until interrupted (Ctrl-C or SIGTERM, as process managers
    stop services), then shut Serve down."""
    start(cfg)
    signal.signal(signal.SIGTERM, _interrupt)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}"
    say(f"ulrec: serving on {url}/v1/recommend (health: {url}/healthz); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
