"""The examples run: the Trainer one in this process (and resumes), the accelerate one on two processes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import torch
from peft import PeftModel

from tests.test_distributed import REPO, free_port
from tests.test_trainer import one_thread  # noqa: F401

EXAMPLES = os.path.join(REPO, "examples")


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_example_trains_saves_and_resumes(tmp_path):
    example = load_example("train_trainer")
    full = example.main(["--output-dir", str(tmp_path / "full"), "--steps", "4", "--save-steps", "2"])
    assert full["steps"] == 4 and full["refreshes"] == 2
    resumed = example.main(["--output-dir", str(tmp_path / "resumed"), "--steps", "4", "--save-steps", "2",
                            "--resume", str(tmp_path / "full" / "checkpoint-2")])
    assert resumed == full

    model = PeftModel.from_pretrained(example.build_model(None, seed=0), str(tmp_path / "full"))
    batch = example.copy_task(2, 64, seed=5)[0]
    with torch.no_grad():
        assert torch.isfinite(model(**{k: v[None] for k, v in batch.items()}).loss)


def test_accelerate_example_on_two_processes(tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), os.path.join(EXAMPLES, "train_accelerate.py"),
        "--output-dir", str(tmp_path), "--steps", "4", "--mixed-precision", "bf16",
    ]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    assert "all 2 processes hold the same mask and weights: True" in done.stdout
    assert "step 4:" in done.stdout and "refreshes 2" in done.stdout
    assert os.path.isfile(tmp_path / "adapter_model.safetensors")
