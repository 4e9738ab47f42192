"""FishDipTrainer on two CPU processes (gloo), launched with `accelerate launch`.

Run as a script (by the test, under `accelerate launch --multi_gpu --num_processes 2` with
`ACCELERATE_USE_CPU=1`), this file trains a tiny Llama with FishDipConfig(density=0.05,
update_every=2, num_regressing=3) for 6 steps saving `checkpoint-3`, resumes a second run from that
checkpoint to step 6, and writes each process's masks and weights to `<out>/rank<r>.pt`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, CHECKPOINT, BATCH_PER_PROCESS = 6, 3, 2


def result_of(trainer) -> dict:
    from tests.test_trainer import eligible_weights

    tuner = trainer.fishdip_model
    return {
        "mask": tuner.mask.clone(),
        "weights": eligible_weights(trainer.model).clone(),
        "values": tuner.fishdip_state.values.detach().clone(),
        "counters": (tuner.step_count, tuner.refresh_count, trainer.state.global_step),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }


def train(output_dir: str, batch: int, resume=None, **overrides):
    from fishdip_peft import FishDipTrainer
    from tests.test_trainer import RowDataset, fishdip_llama, training_args

    args = training_args(output_dir, steps=STEPS, per_device_train_batch_size=batch, save_strategy="steps",
                         save_steps=CHECKPOINT, **overrides)
    trainer = FishDipTrainer(model=fishdip_llama(), args=args, train_dataset=RowDataset())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def edge_cases() -> dict:
    """Direct `step()` calls with per-process batches: a uniform pool, a process that pools nothing,
    and a process whose Fisher fails."""
    import warnings

    from fishdip_peft import distributed, forward_with_per_sample_losses, integrations
    from fishdip_peft import stepping as fishdip_stepping
    from tests.models import causal_batch
    from tests.test_trainer import fishdip_llama

    rank, results = distributed.rank(), {}

    def steps(model, count, nan_on=None):
        for i in range(count):
            batch = causal_batch(10 * i + rank)
            outputs, losses = forward_with_per_sample_losses(model, batch)
            if rank == nan_on:
                losses = torch.full_like(losses, float("nan"))
            model.base_model.step(losses, batch)
            torch.optim.SGD([model.base_model.fishdip_state.values], lr=0.0).step()  # refreshes count these

    uniform = fishdip_llama(sample_aware=False)
    integrations.sync_initial_state(uniform)
    steps(uniform, 2)
    results["uniform_keys"] = uniform.base_model.progress["default"].pool.keys()
    steps(uniform, 1)
    results["uniform_mask"] = uniform.base_model.mask.clone()

    lonely = fishdip_llama()
    integrations.sync_initial_state(lonely)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steps(lonely, 1, nan_on=1)
    results["lonely"] = (lonely.base_model.refresh_count, lonely.base_model.mask.clone())

    failing = fishdip_llama()
    integrations.sync_initial_state(failing)
    steps(failing, 1)
    original = fishdip_stepping.empirical_fisher
    if rank == 1:
        def fail(*args, **kwargs):
            raise FloatingPointError("injected")
        fishdip_stepping.empirical_fisher = fail
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps(failing, 2)
    fishdip_stepping.empirical_fisher = original
    results["failing"] = (failing.base_model.refresh_count, failing.base_model.mask.clone(),
                          any("not finite" in str(w.message) for w in caught))
    unprepared = fishdip_llama()  # e.g. the plain Trainer, which would wrap it in DDP
    unprepared.train()
    try:
        unprepared(**causal_batch(0))
        results["unprepared"] = "ran"
    except RuntimeError as error:
        results["unprepared"] = "refused" if "FishDipTrainer" in str(error) else str(error)
    return results


def worker(out: str) -> None:
    torch.set_num_threads(1)
    full = train(os.path.join(out, "full"), BATCH_PER_PROCESS)
    assert full.accelerator.num_processes == 2 and full.model is full.model_wrapped  # not wrapped in DDP
    resumed = train(os.path.join(out, "resumed"), BATCH_PER_PROCESS,
                    resume=os.path.join(out, "full", f"checkpoint-{CHECKPOINT}"))
    rank = full.accelerator.process_index
    result = {"full": result_of(full), "resumed": result_of(resumed), "edge": edge_cases()}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # an exit with the gloo group alive can abort


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(out, script: str = __file__) -> None:
    """Run `script` (its worker writes into `out`) in 2 processes with accelerate's launcher, on CPU."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), os.path.abspath(script), str(out),
    ]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def test_two_processes_keep_one_mask_and_resume_exactly(tmp_path):
    launch_two_processes(tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for run in ("full", "resumed"):
        for key in ("mask", "weights", "values"):
            assert torch.equal(ranks[0][run][key], ranks[1][run][key]), (run, key)
    for key in ("mask", "weights", "values"):
        assert torch.equal(ranks[0]["full"][key], ranks[0]["resumed"][key]), key
    assert ranks[0]["full"]["counters"] == ranks[0]["resumed"]["counters"] == (STEPS, 3, STEPS)
    assert ranks[0]["full"]["losses"] == ranks[0]["resumed"]["losses"]  # the resumed log includes the first part

    edge = [r["edge"] for r in ranks]
    assert edge[0]["uniform_keys"] != edge[1]["uniform_keys"]  # each process draws its own random keys
    assert torch.equal(edge[0]["uniform_mask"], edge[1]["uniform_mask"])
    assert edge[0]["lonely"][0] == edge[1]["lonely"][0] == 1  # built from process 0's samples alone
    assert torch.equal(edge[0]["lonely"][1], edge[1]["lonely"][1])
    assert edge[0]["failing"][0] == edge[1]["failing"][0] == 1  # the failed refresh is skipped everywhere
    assert torch.equal(edge[0]["failing"][1], edge[1]["failing"][1])
    assert edge[0]["failing"][2] and edge[1]["failing"][2]
    assert edge[0]["unprepared"] == edge[1]["unprepared"] == "refused"

    torch.set_num_threads(1)
    alone = result_of(train(str(tmp_path / "alone"), 2 * BATCH_PER_PROCESS))
    assert torch.equal(alone["mask"], ranks[0]["full"]["mask"])  # the global top-n and the averaged gradient
    torch.testing.assert_close(alone["weights"], ranks[0]["full"]["weights"], rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    worker(sys.argv[1])
