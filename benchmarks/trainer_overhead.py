"""Step time of FISH-DIP through `FishDipTrainer` against a plain LoRA `Trainer` run on the same model.

    python -m benchmarks.trainer_overhead            # writes benchmarks/results/trainer_overhead.json

Methods, all on the same randomly initialised Llama, batch, data order and AdamW:
- `lora-trainer`: `transformers.Trainer` with peft LoRA (r=8, all linear layers);
- `fishdip-trainer`: `FishDipTrainer` (density 0.05, num_regressing 3);
- `fishdip-loop`: the same FISH-DIP training in a hand-written loop (forward, `step()`, backward,
  optimizer step), which separates the cost of the Trainer integration from that of the method;
- `full-ft-trainer`: `Trainer` on every weight, for reference.
Every step is timed from the Trainer's `on_step_begin` to `on_step_end` (the loop: the same span);
FISH-DIP steps that refreshed the mask are reported apart. Runs of the methods are interleaved
`--repeats` times and medians are reported, so a busy machine biases no method.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from fishdip_peft import FishDipConfig, FishDipTrainer, forward_with_per_sample_losses

RESULTS = Path(__file__).resolve().parent / "results" / "trainer_overhead.json"
SIZES = {  # "tiny" is the tests' tiny Llama (tests/models.py)
    "tiny": dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
}
METHODS = ("lora-trainer", "fishdip-trainer", "fishdip-loop", "full-ft-trainer")
FISHDIP = dict(density=0.05, num_regressing=3)
BATCH, LENGTH, LR = 8, 64, 1e-3


def base_model(size: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=LENGTH, tie_word_embeddings=True, **SIZES[size]))


def dataset(size: str, samples: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(samples):
        input_ids = torch.randint(1, SIZES[size]["vocab_size"], (LENGTH,), generator=g)
        labels = input_ids.clone()
        labels[: LENGTH // 2] = -100
        rows.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels})
    return rows


class StepTimer(TrainerCallback):
    def __init__(self, refreshes=lambda: 0):
        self.refreshes, self.steps, self._start = refreshes, [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._before = self.refreshes()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append((time.perf_counter() - self._start, self.refreshes() != self._before))


def run_trainer(method: str, size: str, steps: int, update_every: int, output_dir: str) -> list:
    model, trainer_class = base_model(size), Trainer
    if method == "lora-trainer":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    elif method == "fishdip-trainer":
        model = get_peft_model(model, FishDipConfig(update_every=update_every, **FISHDIP))
        trainer_class = FishDipTrainer
    args = TrainingArguments(output_dir, max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR,
                             lr_scheduler_type="constant", save_strategy="no", logging_steps=steps, report_to=[],
                             use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=0)
    trainer = trainer_class(model=model, args=args, train_dataset=dataset(size, steps * BATCH))
    timer = StepTimer(lambda: trainer.fishdip_model.refresh_count if method == "fishdip-trainer" else 0)
    trainer.add_callback(timer)
    trainer.train()
    return timer.steps


def run_loop(size: str, steps: int, update_every: int) -> list:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = get_peft_model(base_model(size), FishDipConfig(update_every=update_every, **FISHDIP)).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    rows, times = dataset(size, steps * BATCH), []
    for step in range(steps):
        batch = {k: torch.stack([r[k] for r in rows[step * BATCH : (step + 1) * BATCH]]).to(device) for k in rows[0]}
        start, before = time.perf_counter(), model.base_model.refresh_count
        outputs, losses = forward_with_per_sample_losses(model, batch)
        model.base_model.step(losses, batch)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        times.append((time.perf_counter() - start, model.base_model.refresh_count != before))
    return times


def summarize(runs: list[list], warmup: int) -> dict:
    plain = [t for run in runs for t, refreshed in run[warmup:] if not refreshed]
    refresh = [t for run in runs for t, refreshed in run if refreshed]
    return {
        "median_step_ms": round(1000 * statistics.median(plain), 3),
        "steps_timed": len(plain),
        "median_refresh_step_ms": round(1000 * statistics.median(refresh), 3) if refresh else None,
        "refresh_steps_timed": len(refresh),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--update-every", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            runs = {method: [] for method in METHODS}
            for _ in range(args.repeats):
                for method in METHODS:
                    if method == "fishdip-loop":
                        runs[method].append(run_loop(size, args.steps, args.update_every))
                    else:
                        runs[method].append(run_trainer(method, size, args.steps, args.update_every, scratch))
            summary = {method: summarize(runs[method], args.warmup) for method in METHODS}
            lora = summary["lora-trainer"]["median_step_ms"]
            for method in METHODS:
                summary[method]["step_over_lora_trainer"] = round(summary[method]["median_step_ms"] / lora, 3)
            fishdip = summary["fishdip-trainer"]
            loop = summary["fishdip-loop"]["median_step_ms"]
            fishdip["trainer_over_loop"] = round(fishdip["median_step_ms"] / loop, 3)
            results[size] = {"model": SIZES[size], "parameters": sum(p.numel() for p in base_model(size).parameters()),
                             "methods": summary}
            print(size, json.dumps(summary, indent=1))

    report = {
        "command": " ".join(["python -m benchmarks.trainer_overhead", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {"batch": BATCH, "length": LENGTH, "steps": args.steps, "warmup": args.warmup,
                     "repeats": args.repeats, "update_every": args.update_every, **FISHDIP,
                     "lora": "r=8, alpha=16, all linear layers", "optimizer": "Trainer default (AdamW), lr 1e-3"},
        "machine": {"torch": torch.__version__, "threads": args.threads, "cpu_count": os.cpu_count(),
                    "device": "cuda" if torch.cuda.is_available() else "cpu", "platform": platform.platform()},
        "results": results,
    }
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    return report


if __name__ == "__main__":
    main()
