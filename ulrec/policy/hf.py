"""The ``hf`` backend: transformers ``generate``, batched with left padding.

Per-request seeds: ``generate`` runs in its greedy mode over a processor chain that ends in
:class:`SeededSampler`, which draws row i's token from its own ``torch.Generator`` (seeded with
``seeds[i]``) and leaves only that token. So row i's completion depends on its prompt, its seed
and the settings, not on the other rows (up to float round-off from batch padding). Temperature 0
skips the sampler: plain greedy decoding.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from ulrec.policy.base import (
    GenerationResult,
    SamplingConfig,
    SeedStream,
    check_request,
    cut_at_newline,
    fit_prompt,
)
from ulrec.policy.constrained import TitleTrie, TitleTrieLogitsProcessor
from ulrec.prompts import ChatRenderer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class SeededSampler(LogitsProcessor):
    """Samples each row's next token with that row's generator; returns scores that keep only the
    sampled token, so greedy selection inside ``generate`` picks it."""

    def __init__(self, generators: list[torch.Generator]) -> None:
        self.generators = generators

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)
        out = torch.full_like(scores, float("-inf"))
        for row, gen in enumerate(self.generators):
            token = torch.multinomial(probs[row], 1, generator=gen)
            out[row, token] = 0.0
        return out


class StopTokenCriteria(StoppingCriteria):
    """Per-row stop once the last token is EOS or contains a newline."""

    def __init__(self, stop_token_mask: torch.Tensor) -> None:
        self.stop_token_mask = stop_token_mask

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return self.stop_token_mask[input_ids[:, -1]]


def stop_token_mask(tokenizer, vocab_size: int) -> torch.Tensor:
    """Boolean mask over token ids: EOS and every token whose text contains a newline."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    for tok_id in range(min(vocab_size, len(tokenizer))):
        if "\n" in tokenizer.decode([tok_id]):
            mask[tok_id] = True
    if tokenizer.eos_token_id is not None:
        mask[tokenizer.eos_token_id] = True
    return mask


class HFPolicy:
    """Policy on transformers ``generate``. ``titles`` enables the title trie when
    ``policy_cfg.constrained`` is set. Uses CUDA when available, else CPU."""

    backend = "hf"

    def __init__(self, policy_cfg, model_dir: str | Path, titles: list[str] | None = None) -> None:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=_DTYPES[policy_cfg.dtype]).to(device)
        self._setup(model, tokenizer, SamplingConfig.from_policy_config(policy_cfg), policy_cfg.hf_batch_size,
                    titles if policy_cfg.constrained else None, policy_cfg.chat_template, str(model_dir))

    @classmethod
    def from_model(
        cls, model, tokenizer, sampling: SamplingConfig, batch_size: int = 64, titles: list[str] | None = None,
        chat_template: str = "auto",
    ) -> "HFPolicy":
        """Wrap an already loaded model (e.g. one just trained in this process); ``titles`` turns
        on constrained decoding."""
        policy = cls.__new__(cls)
        policy._setup(model, tokenizer, sampling, batch_size, titles, chat_template)
        return policy

    def _setup(self, model, tokenizer, sampling: SamplingConfig, batch_size: int, titles: list[str] | None,
               chat_template: str = "auto", source: str = "the model") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.renderer = ChatRenderer(tokenizer, chat_template, source=source)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.sampling = sampling
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        self.max_model_len = int(getattr(model.config, "max_position_embeddings", 2048))
        self._seeds = SeedStream(sampling.seed)
        self._stop_mask = stop_token_mask(tokenizer, model.config.vocab_size).to(self.device)
        self._trie = TitleTrie(tokenizer, titles) if titles else None
        if self._trie is not None and self._trie.max_len > sampling.max_tokens:
            self.sampling = replace(sampling, max_tokens=self._trie.max_len)

    def generate(
        self, prompts: list[str], seeds: list[int] | None = None, temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> list[GenerationResult]:
        check_request(prompts, seeds, temperature)
        limit = self.sampling.max_tokens if max_tokens is None else int(max_tokens)
        if not prompts:
            return []
        seeds = self._seeds.take(len(prompts)) if seeds is None else [int(s) for s in seeds]
        temp = self.sampling.temperature if temperature is None else temperature
        ids = [
            fit_prompt(x, self.max_model_len, limit, self.tokenizer.bos_token_id)
            for x in self.tokenizer(self.renderer.render_all(prompts))["input_ids"]
        ]
        # Similar lengths together: less padding. Results are returned in the callers' order.
        order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
        results: list[GenerationResult | None] = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            outs = self._generate_batch([ids[i] for i in chunk], [seeds[i] for i in chunk], temp, limit)
            for i, res in zip(chunk, outs):
                results[i] = res
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _generate_batch(self, ids: list[list[int]], seeds: list[int], temperature: float,
                        max_tokens: int) -> list[GenerationResult]:
        batch = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(self.device)
        prompt_len = batch["input_ids"].shape[1]
        processors = LogitsProcessorList()
        if self._trie is not None:
            processors.append(TitleTrieLogitsProcessor(self._trie, prompt_len))
        if temperature > 0:
            processors.append(TemperatureLogitsWarper(temperature))
            if self.sampling.top_p < 1.0:
                processors.append(TopPLogitsWarper(self.sampling.top_p))
            gens = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]
            processors.append(SeededSampler(gens))
        out = self.model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=max_tokens,
            logits_processor=processors,
            stopping_criteria=StoppingCriteriaList([StopTokenCriteria(self._stop_mask)]),
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            # Only our processors: no temperature/top-k from the model's generation_config.
            generation_config=None,
            top_k=None,
            top_p=None,
            temperature=None,
        )
        new_tokens = out[:, prompt_len:].tolist()
        results = []
        for row in new_tokens:
            n = len(row)
            for j, tok in enumerate(row):
                if self._stop_mask[tok]:
                    n = j + 1
                    break
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
            results.append(GenerationResult(text=cut_at_newline(text), num_tokens=n))
        return results

    def close(self) -> None:
        self.model = None
