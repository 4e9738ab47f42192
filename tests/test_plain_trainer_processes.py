"""The plain transformers Trainer (and TRL's SFTTrainer) on two CPU processes (gloo), automatic mode.

The Trainer wraps the PeftModel in DistributedDataParallel, whose reducer averages the values'
gradient: autograd runs the values' gradient accumulator once per backward, after every tap has added
its part to `values.grad`, and the reducer reads `.grad` there. Run as a script (by the test, under
`accelerate launch --multi_gpu --num_processes 2` with `ACCELERATE_USE_CPU=1`), this file trains tiny
Llamas and writes each process's results to `<out>/rank<r>.pt`.
"""

from __future__ import annotations

import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, BATCH_PER_PROCESS = 6, 2


def plain_trainer(output_dir: str, batch: int, **overrides):
    from transformers import Trainer

    from tests.test_trainer import RowDataset, fishdip_llama, training_args

    config = {key: overrides.pop(key) for key in ("sample_aware",) if key in overrides}
    args = training_args(output_dir, steps=STEPS, per_device_train_batch_size=batch, **overrides)
    return Trainer(model=fishdip_llama(**config), args=args, train_dataset=RowDataset())


def result_of(trainer) -> dict:
    from tests.test_trainer import eligible_weights

    tuner = trainer.model.base_model
    return {
        "mask": tuner.mask.clone(),
        "weights": eligible_weights(trainer.model).clone(),
        "values": tuner.fishdip_state.values.detach().clone(),
        "counters": (tuner.step_count, tuner.refresh_count, trainer.state.global_step),
    }


def sft_trainer(output_dir: str):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from fishdip_peft import FishDipConfig
    from tests.models import tiny_llama, word_tokenizer_and_texts

    tokenizer, texts = word_tokenizer_and_texts()
    config = SFTConfig(output_dir, max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2, report_to=[],
                       use_cpu=True, logging_steps=1, save_strategy="no", max_length=16, disable_tqdm=True)
    return SFTTrainer(model=tiny_llama(), args=config, train_dataset=Dataset.from_dict({"text": texts}),
                      processing_class=tokenizer,
                      peft_config=FishDipConfig(density=0.05, update_every=2, num_regressing=3))


def worker(out: str) -> None:
    torch.set_num_threads(1)
    results = {}
    plain = plain_trainer(os.path.join(out, "plain"), BATCH_PER_PROCESS)
    plain.train()
    assert isinstance(plain.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    results["plain"] = result_of(plain)

    # gradient accumulation (DDP's no_sync), non-reentrant checkpointing and the uniform pool
    variant = plain_trainer(os.path.join(out, "variant"), BATCH_PER_PROCESS, gradient_accumulation_steps=2,
                            gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False},
                            sample_aware=False)
    variant.train()
    results["variant"] = result_of(variant)

    sft = sft_trainer(os.path.join(out, "sft"))
    sft.train()
    results["sft"] = result_of(sft)

    # reentrant checkpointing runs the values' accumulator once per segment: DDP would average a partial
    # gradient, so the first optimizer step is refused
    reentrant = plain_trainer(os.path.join(out, "reentrant"), BATCH_PER_PROCESS, gradient_checkpointing=True)
    try:
        reentrant.train()
        results["reentrant"] = "trained"
    except RuntimeError as error:
        results["reentrant"] = "refused" if "use_reentrant" in str(error) else str(error)
    results["reentrant_steps"] = reentrant.model.base_model.step_count

    torch.save(results, os.path.join(out, f"rank{plain.accelerator.process_index}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # an exit with the gloo group alive can abort


def test_plain_trainer_in_two_processes_keeps_one_mask(tmp_path):
    from tests.test_distributed import launch_two_processes

    launch_two_processes(tmp_path, __file__)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for run in ("plain", "variant", "sft"):
        for key in ("mask", "weights", "values"):
            assert torch.equal(ranks[0][run][key], ranks[1][run][key]), (run, key)
        assert ranks[0][run]["counters"] == ranks[1][run]["counters"], run
        assert ranks[0][run]["mask"].any() and ranks[0][run]["values"].abs().sum() > 0, run
    assert ranks[0]["plain"]["counters"] == (STEPS, 3, STEPS)  # the first mask, then at steps 2 and 4
    assert ranks[0]["variant"]["counters"] == (STEPS, 3, STEPS)
    assert ranks[0]["sft"]["counters"] == (4, 2, 4)
    assert ranks[0]["reentrant"] == ranks[1]["reentrant"] == "refused"
    assert ranks[0]["reentrant_steps"] == ranks[1]["reentrant_steps"] == 0  # refused before any update

    torch.set_num_threads(1)
    alone = plain_trainer(str(tmp_path / "alone"), 2 * BATCH_PER_PROCESS)
    alone.train()
    alone = result_of(alone)
    assert torch.equal(alone["mask"], ranks[0]["plain"]["mask"])  # the global top-n and DDP's averaged gradient
    torch.testing.assert_close(alone["weights"], ranks[0]["plain"]["weights"], rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    worker(sys.argv[1])
