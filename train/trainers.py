"""ULRec's stage-2 trainer: TRL's KTO with a title-only log-ratio plus α × SFT (paper Eq. 9–10, A.1).

``ULRecKTOTrainer`` subclasses ``trl.KTOTrainer`` (TRL 1.16) and overrides only what changes:

* ``_prepare_dataset``: after TRL tokenizes, add a ``title_mask`` column per row — which completion
  tokens are the item title, from character offsets (:func:`ulrec.kto_mask.title_token_mask`).
* the data collator: TRL's ``completion_mask`` decides which tokens the policy and reference
  log-probabilities sum over (``labels`` are -100 elsewhere), so with the mask on it becomes the
  title mask; the full completion mask (format tokens and EOS included) is kept as
  ``full_completion_mask`` for the SFT term. The KL estimate uses TRL's ``KL_completion_mask``,
  which stays the whole completion, as the authors did.
* ``compute_loss``: TRL's KTO loss on that batch, plus ``sft_alpha`` × the mean token NLL of the
  whole completion (EOS included) over the batch's positive rows. The SFT term needs the format
  tokens' log-probs, which the title-masked forward does not compute, so it costs one more policy
  forward/backward on the batch's positive rows.

With ``mask_format_tokens=False`` and ``sft_alpha=0`` the loss is exactly TRL's KTO loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from trl import KTOConfig, KTOTrainer
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

from ulrec.errors import InputError
from ulrec.kto_mask import title_token_mask


@dataclass
class ULRecKTOConfig(KTOConfig):
    """``KTOConfig`` plus ULRec's two knobs."""

    sft_alpha: float = field(
        default=0.1,
        metadata={"help": "Weight α of the SFT loss on positive rows (paper Eq. 10); 0 disables it."},
    )
    mask_format_tokens: bool = field(
        default=True,
        metadata={"help": "Count only the title's tokens in the policy/reference log-ratio (paper A.1)."},
    )


@dataclass
class TitleMaskCollator(DataCollatorForUnpairedPreference):
    """TRL's unpaired-preference collator; the log-ratio mask becomes the title mask when asked.

    Adds ``full_completion_mask`` (every completion token, EOS included) for the SFT term.
    """

    use_title_mask: bool = True

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        batch["full_completion_mask"] = batch["completion_mask"]
        if self.use_title_mask:
            width = batch["input_ids"].shape[1]
            rows = []
            for example in examples:
                mask = [0] * len(example["prompt_ids"]) + [int(m) for m in example["title_mask"]]
                if self.max_length is not None:
                    mask = mask[: self.max_length]
                rows.append(torch.tensor(mask + [0] * (width - len(mask)), dtype=torch.int64))
            batch["completion_mask"] = torch.stack(rows)
        return batch


def completion_title_mask(
    tokenizer: Any, prompt: str, completion: str, prompt_ids: list[int], completion_ids: list[int]
) -> list[bool]:
    """Title mask over ``completion_ids`` as TRL tokenized them (``prompt + completion`` in one
    call, completion starting at ``len(prompt_ids)``); ``completion`` already ends with EOS."""
    encoded = tokenizer(text=prompt + completion, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != list(prompt_ids) + list(completion_ids):
        raise InputError("title mask: tokenizer output differs from the trainer's tokenization")
    shift = len(prompt)
    offsets = [(start - shift, end - shift) for start, end in encoded["offset_mapping"][len(prompt_ids):]]
    return title_token_mask(completion, offsets, eos_token=tokenizer.eos_token)


def score_only_labelled_positions() -> None:
    """Make TRL's fused LM head score only the labelled positions on CPU too.

    TRL 1.16's ``add_fused_lm_head`` projects only positions with a label on Triton devices and
    every position elsewhere (to keep tile shapes static for compilers such as Neuron's). Our
    losses label a completion of ~10 tokens after a prompt of ~500, so on CPU ~98% of the LM-head
    work is thrown away: measured on the quickstart model, an SFT step took 3.2 s instead of 0.75 s
    and a KTO step 10.4 s instead of 4.2 s. The values are the same either way (the unlabelled
    positions are zeroed out); eager CPU execution has no recompilation to avoid.

    TRL decides this with ``trl.trainer.utils._use_triton`` (private). We replace that one name in
    that one module, leaving the kernel choice (``trl.kernels``) alone; a TRL without it is left as
    it is.
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None or getattr(original, "_ulrec_compact", False):
        return

    def use_compact_scoring(device: torch.device) -> bool:
        return device.type == "cpu" or original(device)

    use_compact_scoring._ulrec_compact = True  # type: ignore[attr-defined]
    trl_utils._use_triton = use_compact_scoring


class ULRecKTOTrainer(KTOTrainer):
    """KTO on the title's tokens + α × SFT on positives. Takes a :class:`ULRecKTOConfig`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        config = kwargs.get("args")
        if not isinstance(config, ULRecKTOConfig):
            raise InputError("ULRecKTOTrainer needs args=ULRecKTOConfig(...)")
        if kwargs.get("data_collator") is not None:
            raise InputError("ULRecKTOTrainer builds its own data collator (TitleMaskCollator); pass none")
        tokenizer = kwargs.get("processing_class")
        if tokenizer is None or not getattr(tokenizer, "is_fast", False):
            raise InputError("ULRecKTOTrainer needs a fast tokenizer (processing_class) for character offsets")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        kwargs["data_collator"] = TitleMaskCollator(
            pad_token_id=tokenizer.pad_token_id,
            max_length=config.max_length,
            pad_to_multiple_of=config.pad_to_multiple_of,
            use_title_mask=config.mask_format_tokens,
        )
        self.sft_alpha = config.sft_alpha
        super().__init__(*args, **kwargs)

    def _prepare_dataset(
        self,
        dataset: Dataset | IterableDataset,
        processing_class: Any,
        args: KTOConfig,
        dataset_name: str,
    ) -> Dataset | IterableDataset:
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if not args.mask_format_tokens or "title_mask" in (dataset.column_names or []):
            return dataset
        tokenizer = self._tokenizer

        def add_title_mask(example: dict[str, Any]) -> dict[str, Any]:
            mask = completion_title_mask(
                tokenizer, example["prompt"], example["completion"], example["prompt_ids"], example["completion_ids"]
            )
            return {"title_mask": mask}

        map_kwargs: dict[str, Any] = {}
        if isinstance(dataset, Dataset):
            map_kwargs = {"num_proc": args.dataset_num_proc, "desc": f"Title masks for {dataset_name} dataset"}
        return dataset.map(add_title_mask, **map_kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "title_mask" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "title_mask"]

    def _sft_loss(self, model: Any, inputs: dict[str, Any], full_mask: torch.Tensor) -> torch.Tensor | None:
        """Mean token NLL of the whole completion (EOS included) over the positive rows; None if none."""
        positive = inputs["label"].to(torch.bool)
        if not bool(positive.any()):
            return None
        input_ids = inputs["input_ids"][positive]
        labels = input_ids.masked_fill(full_mask[positive] == 0, -100)
        outputs = model(
            input_ids=input_ids,
            attention_mask=inputs["attention_mask"][positive],
            labels=labels,
            use_cache=False,
            fused_lm_head=True,
        )
        return outputs.loss

    def _log_raw_log_ratios(self) -> None:
        """TRL logs rewards = β × log-ratio. At the paper's β = 0.01 a log-ratio of 10 nats shows as
        0.1, so the policy's movement hides in the third decimal; log the log-ratios themselves."""
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        for kind in ("chosen", "rejected"):
            values = metrics.get(f"rewards/{kind}")
            if values and len(metrics[f"logratio/{kind}"]) < len(values):
                metrics[f"logratio/{kind}"].append(values[-1] / self.beta)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        full_mask = inputs.pop("full_completion_mask")
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        self._log_raw_log_ratios()
        if self.sft_alpha == 0:
            return result
        loss, outputs = result if return_outputs else (result, None)
        sft = self._sft_loss(model, inputs, full_mask)
        if sft is not None:
            loss = loss + self.sft_alpha * sft
        # Every rank joins the gather, also one whose batch had no positive row.
        value = sft.detach().reshape(1) if sft is not None else torch.full((1,), float("nan"), device=loss.device)
        gathered = self.accelerator.gather_for_metrics(value)
        if not bool(torch.isnan(gathered).all()):
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["sft_loss"].append(gathered.nanmean().item())
        return (loss, outputs) if return_outputs else loss
