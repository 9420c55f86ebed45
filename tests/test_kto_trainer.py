"""ULRecKTOTrainer against TRL's plain KTOTrainer and against a hand computation of Eq. 9–10."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _train_helpers import byte_level_bpe, kto_rows, tiny_llama  # noqa: E402

BETA = 0.5
# The GPU check runs this file with ULREC_TEST_CUDA=1 (TRL's fused log-prob kernel differs there).
USE_CPU = os.environ.get("ULREC_TEST_CUDA") != "1"


@pytest.fixture(scope="module")
def setup():
    tokenizer = byte_level_bpe()
    ref = tiny_llama(tokenizer, seed=0)
    policy = copy.deepcopy(ref)
    # A policy different from its reference, so log-ratios and KL are not zero.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return tokenizer, policy, ref


def make_trainer(setup, tmp_path, cls_name: str, **extra):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    from train.trainers import ULRecKTOConfig, ULRecKTOTrainer

    tokenizer, policy, ref = setup
    common = dict(
        output_dir=str(tmp_path / cls_name),
        per_device_train_batch_size=4,
        beta=BETA,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=USE_CPU,
        report_to="none",
        disable_tqdm=True,
    )
    cls, config = (KTOTrainer, KTOConfig(**common)) if cls_name == "trl" else (ULRecKTOTrainer, ULRecKTOConfig(**common, **extra))
    return cls(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(ref),
        args=config,
        train_dataset=Dataset.from_list(kto_rows(8)),
        processing_class=tokenizer,
    )


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def loss_on_first_batch(trainer) -> torch.Tensor:
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, first_batch(trainer))


def token_logps(model, input_ids, attention_mask) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t >= 1, from the model's plain logits."""
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def hand_sft(model, batch, completion_mask) -> torch.Tensor:
    pos = batch["label"].bool()
    logps = token_logps(model, batch["input_ids"][pos], batch["attention_mask"][pos])
    mask = completion_mask[pos][:, 1:].float()
    return -(logps * mask).sum() / mask.sum()


def test_mask_off_alpha_zero_equals_trl_kto(setup, tmp_path):
    plain = make_trainer(setup, tmp_path, "trl")
    ours = make_trainer(setup, tmp_path, "ours", sft_alpha=0.0, mask_format_tokens=False)
    assert torch.equal(first_batch(plain)["input_ids"], first_batch(ours)["input_ids"])
    expected = loss_on_first_batch(plain)
    assert expected > 0
    torch.testing.assert_close(loss_on_first_batch(ours), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mask", [False, True])
def test_alpha_adds_exactly_alpha_times_sft_over_the_whole_completion(setup, tmp_path, mask):
    alpha = 0.7
    base = make_trainer(setup, tmp_path, "a0", sft_alpha=0.0, mask_format_tokens=mask)
    with_sft = make_trainer(setup, tmp_path, "a1", sft_alpha=alpha, mask_format_tokens=mask)
    batch = first_batch(with_sft)
    assert batch["label"].any() and not batch["label"].all()
    sft = hand_sft(with_sft.model, batch, batch["full_completion_mask"])
    # the SFT term covers format tokens and EOS too: more tokens than the title mask
    assert batch["full_completion_mask"].sum() > batch["completion_mask"].sum() or not mask
    diff = loss_on_first_batch(with_sft) - loss_on_first_batch(base)
    torch.testing.assert_close(diff, alpha * sft, rtol=1e-5, atol=1e-6)


def title_positions(tokenizer, prompt: str, completion: str) -> set[int]:
    """Token indices holding title characters, via char→token lookups (not the trainer's route)."""
    text = prompt + completion
    enc = tokenizer(text)
    start = len(prompt) + completion.index("recommend[ ") + len("recommend[ ")
    end = len(prompt) + completion.rindex(" ]")
    return {enc.char_to_token(i) for i in range(start, end)} - {None}


def test_mask_makes_log_ratio_title_only(setup, tmp_path):
    tokenizer, _, _ = setup
    trainer = make_trainer(setup, tmp_path, "masked", sft_alpha=0.0, mask_format_tokens=True)
    batch = first_batch(trainer)
    dataset = trainer.train_dataset
    n = batch["input_ids"].shape[0]

    # the batch's log-ratio mask is exactly the title tokens of each row
    for i in range(n):
        row = dataset[i]
        expected = title_positions(tokenizer, row["prompt"], row["completion"])
        assert set(torch.nonzero(batch["completion_mask"][i]).flatten().tolist()) == expected

    policy, ref = trainer.model, trainer.ref_model
    title = batch["completion_mask"][:, 1:].float()
    r = ((token_logps(policy, batch["input_ids"], batch["attention_mask"])
          - token_logps(ref, batch["input_ids"], batch["attention_mask"])) * title).sum(-1)
    kl_mask = batch["KL_completion_mask"][:, 1:].float()  # the KL estimate stays unmasked
    kl = ((token_logps(policy, batch["KL_input_ids"], batch["KL_attention_mask"])
           - token_logps(ref, batch["KL_input_ids"], batch["KL_attention_mask"])) * kl_mask).sum(-1)
    kl = kl.mean().clamp(min=0)
    label = batch["label"].bool()
    losses = torch.where(label, 1 - F.sigmoid(BETA * (r - kl)), 1 - F.sigmoid(BETA * (kl - r)))
    masked_loss = loss_on_first_batch(trainer)
    torch.testing.assert_close(masked_loss, losses.mean(), rtol=1e-5, atol=1e-6)

    unmasked = make_trainer(setup, tmp_path, "unmasked", sft_alpha=0.0, mask_format_tokens=False)
    assert abs(loss_on_first_batch(unmasked) - masked_loss) > 1e-4


def test_needs_its_config_class(setup, tmp_path):
    from trl import KTOConfig

    from train.trainers import ULRecKTOTrainer
    from ulrec.errors import InputError

    tokenizer, policy, ref = setup
    with pytest.raises(InputError, match="ULRecKTOConfig"):
        ULRecKTOTrainer(model=policy, ref_model=ref, args=KTOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True),
                         processing_class=tokenizer)


def test_compact_scoring_gives_the_same_log_probs_and_gradients(setup):
    """score_only_labelled_positions changes which positions TRL's fused head projects on CPU,
    not the values: per-token log-probs and gradients match the score-everything path."""
    import trl.trainer.utils as trl_utils

    from train.trainers import score_only_labelled_positions

    tokenizer, policy, _ = setup
    ids = tokenizer(["Action 1: recommend[ Heat (1995) ]", "Action 2: recommend[ [REC] (2007) ]"], padding=True,
                    return_tensors="pt")
    labels = ids["input_ids"].masked_fill(torch.arange(ids["input_ids"].shape[1]) < 6, -100)
    labels = labels.masked_fill(ids["attention_mask"] == 0, -100)
    results = []
    for compact in (False, True):
        model = copy.deepcopy(policy)
        saved = trl_utils._use_triton
        try:
            if compact:
                score_only_labelled_positions()
                assert trl_utils._use_triton(torch.device("cpu")) is True
            else:
                trl_utils._use_triton = lambda device: False
            trl_utils.add_fused_lm_head(model)
            out = model(**ids, labels=labels, fused_lm_head=True)
            out.loss.backward()
        finally:
            trl_utils._use_triton = saved
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((out.log_probs.detach(), out.loss.detach(), grads))
    (lp0, loss0, g0), (lp1, loss1, g1) = results
    torch.testing.assert_close(lp1, lp0)
    torch.testing.assert_close(loss1, loss0)
    torch.testing.assert_close(g1, g0)
