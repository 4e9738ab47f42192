"""Fine-tune a causal LM with FISH-DIP through `FishDipTrainer`, a drop-in `transformers.Trainer`.

    python examples/train_trainer.py --output-dir runs/trainer
    python examples/train_trainer.py --output-dir runs/trainer --resume runs/trainer/checkpoint-4
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/train_trainer.py   # CPU, 2 processes
    accelerate launch --multi_gpu --num_processes 2 examples/train_trainer.py                        # 2 GPUs

Without `--model` it trains a tiny random Llama on a toy copy task, so it runs anywhere in seconds;
`--model` takes any causal-LM folder or hub name (the toy task then uses that model's vocabulary).
"""

from __future__ import annotations

import argparse

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainingArguments

from fishdip_peft import FishDipConfig, FishDipTrainer


def build_model(name: str | None, seed: int):
    if name:
        return AutoModelForCausalLM.from_pretrained(name)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def copy_task(size: int, vocab: int, half: int = 6, seed: int = 0) -> list[dict]:
    """Sequences `x x`: the model learns to repeat the first half; only the second half is a target."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(size):
        x = torch.randint(1, min(vocab, 64), (half,), generator=g)
        input_ids = torch.cat([x, x])
        labels = input_ids.clone()
        labels[:half] = -100
        rows.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels})
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="causal-LM folder or hub name (default: tiny random Llama)")
    parser.add_argument("--output-dir", default="runs/fishdip-trainer")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--update-every", type=int, default=2)
    parser.add_argument("--num-regressing", type=int, default=3)
    parser.add_argument("--save-steps", type=int, default=4)
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--resume", default=None, help="a checkpoint-N folder to resume from")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    base = build_model(args.model, args.seed)
    config = FishDipConfig(density=args.density, update_every=args.update_every, num_regressing=args.num_regressing)
    model = get_peft_model(base, config)
    training_args = TrainingArguments(
        args.output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation, learning_rate=args.lr, lr_scheduler_type="constant",
        logging_steps=1, save_steps=args.save_steps, eval_strategy="steps", eval_steps=args.save_steps,
        bf16=args.bf16, seed=args.seed, report_to=[], disable_tqdm=True,
    )
    vocab = base.config.vocab_size
    trainer = FishDipTrainer(model=model, args=training_args, train_dataset=copy_task(64, vocab, seed=args.seed),
                             eval_dataset=copy_task(16, vocab, seed=args.seed + 1))
    trainer.train(resume_from_checkpoint=args.resume)
    metrics = trainer.evaluate()
    trainer.save_model(args.output_dir)  # the sparse-delta adapter: adapter_model.safetensors
    tuner = trainer.fishdip_model
    summary = {"eval_loss": metrics["eval_loss"], "refreshes": tuner.refresh_count, "k": tuner.num_trainable,
               "steps": trainer.state.global_step}
    if trainer.is_world_process_zero():
        print(f"FISH-DIP trained K={summary['k']} entries, {summary['refreshes']} mask refreshes, "
              f"eval loss {summary['eval_loss']:.4f}; adapter saved to {args.output_dir}")
    return summary


if __name__ == "__main__":
    main()
