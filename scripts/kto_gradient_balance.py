"""How much of a stage-2 step is KTO? The gradients of the two terms of ULRec's loss, measured apart.

Stage 2 minimises L_KTO + α·L_SFT (paper Eq. 10). With β = 0.01 the KTO term's gradient carries a
factor β·σ'(·)·λ — about 0.0025·λ at the start — while the SFT term's carries α. If the SFT
gradient is much the larger, the optimiser's step mostly follows it and stage 2 behaves like more
SFT: the unpaired negatives barely count. This script loads a run's stage-2 job (the stage-1
checkpoint and the KTO rows, exactly as `ulrec train kto` would) and, on the first batches, takes
each term's gradient alone over the trainable parameters: their norms, the ratio, the cosine.

    python scripts/kto_gradient_balance.py --config configs/quickstart.yaml [--batches 4] [overrides]

Reads only; prints a markdown table and writes nothing. Runs on one process, no Ray.
"""

from __future__ import annotations

import argparse
import sys
import tempfile


def _flat_grad(params) -> "torch.Tensor":
    import torch

    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def measure(cfg, batches: int) -> list[dict[str, float]]:
    import torch
    from trl import KTOTrainer

    from train.stages import build_trainer, kto_job

    job = kto_job(cfg)
    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(job, out)
        model = trainer.model
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        rows = []
        for index, inputs in enumerate(trainer.get_train_dataloader()):
            if index >= batches:
                break
            inputs = trainer._prepare_inputs(dict(inputs))
            full_mask = inputs.pop("full_completion_mask")
            model.zero_grad(set_to_none=True)
            kto = KTOTrainer.compute_loss(trainer, model, dict(inputs))  # the KTO term alone
            kto.backward()
            g_kto = _flat_grad(params).clone()
            model.zero_grad(set_to_none=True)
            sft = trainer._sft_loss(model, inputs, full_mask)
            if sft is None:  # no positive row in this batch: no SFT term
                continue
            (trainer.sft_alpha * sft).backward()
            g_sft = _flat_grad(params)
            cosine = torch.nn.functional.cosine_similarity(g_kto, g_sft, dim=0).item()
            rows.append({
                "batch": index, "positives": int(inputs["label"].sum().item()), "rows": len(inputs["label"]),
                "kto_loss": kto.item(), "sft_loss": sft.item(),
                "grad_kto": g_kto.norm().item(), "grad_alpha_sft": g_sft.norm().item(),
                "ratio": g_sft.norm().item() / max(g_kto.norm().item(), 1e-30), "cosine": cosine,
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    from ulrec.runtime_env import apply_defaults

    apply_defaults()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    from ulrec.config import ConfigError, load_config
    from ulrec.errors import UlrecError

    try:
        cfg = load_config(args.config, args.overrides)
        rows = measure(cfg, args.batches)
    except (ConfigError, UlrecError) as exc:
        print(f"kto_gradient_balance: error: {exc}", file=sys.stderr)
        return 2
    print(f"β {cfg.kto.beta:g}, α {cfg.kto.alpha:g}, model {kto_model(cfg)}\n")
    print("| batch | rows (pos.) | KTO loss | SFT loss | ‖∇KTO‖ | ‖α∇SFT‖ | ratio | cosine |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['batch']} | {r['rows']} ({r['positives']}) | {r['kto_loss']:.3f} | {r['sft_loss']:.3f} | "
              f"{r['grad_kto']:.3g} | {r['grad_alpha_sft']:.3g} | {r['ratio']:.1f} | {r['cosine']:+.3f} |")
    return 0


def kto_model(cfg) -> str:
    return "LoRA" if cfg.kto.lora.enabled else "full fine-tuning"


if __name__ == "__main__":
    sys.exit(main())
