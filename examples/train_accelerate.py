"""Fine-tune a causal LM with FISH-DIP in a custom training loop driven by accelerate.

    python examples/train_accelerate.py --output-dir runs/accelerate
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py   # CPU
    accelerate launch --multi_gpu --num_processes 2 examples/train_accelerate.py                        # 2 GPUs

What differs from an ordinary accelerate loop:
- `fishdip_peft.prepare_with_accelerator` instead of `accelerator.prepare`: the model is placed on
  the device but not wrapped in DDP (its one trainable tensor gets its gradient outside autograd);
- per-sample losses from `forward_with_per_sample_losses`; `step()` on the first micro-batch of each
  optimizer step (before its backward), `offer()` on the others, so refreshes count optimizer steps;
- `fishdip_peft.sync_gradients(model)` before clipping averages the gradient over the processes
  (the optimizer would otherwise do it at its step, after clipping).
Without `--model` it trains a tiny random Llama on a toy copy task (see train_trainer.py).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import get_peft_model
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fishdip_peft  # noqa: E402
from fishdip_peft import FishDipConfig, forward_with_per_sample_losses  # noqa: E402
from train_trainer import build_model, copy_task  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="causal-LM folder or hub name (default: tiny random Llama)")
    parser.add_argument("--output-dir", default="runs/fishdip-accelerate")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--update-every", type=int, default=2)
    parser.add_argument("--num-regressing", type=int, default=3)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def fingerprint(model) -> int:
    """A hash of the mask and of every eligible weight, to show that all processes agree."""
    digest = hashlib.sha256(model.base_model.mask.cpu().numpy().tobytes())
    for _, weight in model.base_model.eligible_parameters():
        digest.update(weight.detach().cpu().float().numpy().tobytes())
    return int.from_bytes(digest.digest()[:7], "big")


def main(argv=None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    base = build_model(args.model, args.seed)
    config = FishDipConfig(density=args.density, update_every=args.update_every, num_regressing=args.num_regressing)
    model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    loader = DataLoader(copy_task(64, base.config.vocab_size, seed=args.seed), batch_size=args.batch_size, shuffle=True)
    model, optimizer, loader = fishdip_peft.prepare_with_accelerator(accelerator, model, optimizer, loader)

    model.train()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for step in range(args.steps):
        for micro in range(args.accumulation):
            batch = next(batches)
            outputs, losses = forward_with_per_sample_losses(model, batch)
            if micro == 0:
                model.base_model.step(losses, batch)  # counts the optimizer step, refreshes the mask when due
            else:
                model.base_model.offer(losses, batch)  # pools only
            accelerator.backward(outputs.loss / args.accumulation)
        fishdip_peft.sync_gradients(model)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss = accelerator.reduce(outputs.loss.detach(), "mean").item()
        accelerator.print(f"step {step + 1}: loss {loss:.4f}, refreshes {model.base_model.refresh_count}")

    prints = accelerator.gather(torch.tensor([fingerprint(model)], device=accelerator.device))
    agree = bool((prints == prints[0]).all())
    accelerator.print(f"all {accelerator.num_processes} processes hold the same mask and weights: {agree}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        model.save_pretrained(args.output_dir)
    accelerator.end_training()
    return {"loss": loss, "refreshes": model.base_model.refresh_count, "agree": agree}


if __name__ == "__main__":
    main()
