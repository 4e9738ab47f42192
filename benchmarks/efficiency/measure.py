"""Measurement helpers of the efficiency benchmark: peak memory, timing, models, batches, environment.

Memory: on CPU the peak resident set size (VmHWM) of a measurement window; before each window
`PeakMeter.start` runs `gc.collect()` and glibc `malloc_trim(0)` (so memory freed earlier is not counted)
and resets the peak (`/proc/self/clear_refs` 5). On CUDA, `torch.cuda.max_memory_allocated` of the window.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import math
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

SIZES = ("tiny", "35m", "135m")  # the default run
ALL_SIZES = SIZES + ("2l",)  # "2l": SmolLM2-135M's width with 2 layers, for the sequence-length run
SMOLLM2_VOCAB = 49152
# Randomly initialised Llama models with SmolLM2's vocabulary (and its rope/norm settings); "135m" is the
# real SmolLM2-135M-Instruct (hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV heads).
SIZE_CONFIGS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "35m": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=10, num_attention_heads=6,
                num_key_value_heads=2),
    "2l": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
               num_key_value_heads=3),
}
REPO_ROOT = Path(__file__).resolve().parents[2]


# -- memory -------------------------------------------------------------------------------------------
def _status_bytes(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def current_rss() -> int:
    rss = _status_bytes("VmRSS")
    if rss is None:
        import psutil

        rss = psutil.Process().memory_info().rss
    return rss


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMeter:
    """Peak memory of a window: VmHWM after a reset (Linux), else a 1 ms RSS sampler; CUDA: max allocated."""

    def __init__(self, device: str):
        self.device = device
        self._sampler: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._sampled = 0

    def start(self) -> int:
        """Begin a window; returns the memory in use at its start."""
        import torch

        gc.collect()
        malloc_trim()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        self.method = "VmHWM"
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            self.method = "sampled"
            self._stop.clear()
            self._sampled = current_rss()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return current_rss()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, current_rss())
            time.sleep(0.001)

    def peak(self) -> int:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self._sampler = None
            return max(self._sampled, current_rss())
        return _status_bytes("VmHWM") or current_rss()


# -- timing -------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def timed(device: str, fn, *args, **kwargs) -> tuple[Any, float, float]:
    """`fn(*args, **kwargs)` with its wall and process-CPU seconds (the device synchronized on both sides)."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    sync(device)
    return result, time.perf_counter() - t0, time.process_time() - c0


def set_threads(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def progress(iterable, **kwargs):
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, leave=False, dynamic_ncols=True, **kwargs)


# -- models, data and checkpoints -----------------------------------------------------------------------
def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def build_model(size: str, dtype_name: str, device: str):
    """A causal LM of the given size (random init with a fixed seed, or the default SmolLM2-135M)."""
    import torch

    dtype = torch_dtype(dtype_name)
    if size == "135m":
        from benchmarks.default_model import load_default_model

        model = load_default_model(dtype)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=SMOLLM2_VOCAB, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2, **SIZE_CONFIGS[size],
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(dtype)
    return model.to(device)


def make_batch(batch_size: int, seq_len: int, vocab: int, seed: int, device: str) -> dict:
    """Random token ids, no padding, every token a target (labels = input_ids)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g)
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": input_ids.clone().to(device),
    }


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def file_bytes(folder: Path) -> tuple[int, int, list[str]]:
    """Bytes of the weight files, of every file, and the file names of a checkpoint folder."""
    weights = sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin"))
    total = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return weights, total, sorted(f.name for f in folder.iterdir())


def safetensors_entries(folder: Path) -> dict[str, int]:
    """Entries of every tensor stored in the folder's safetensors files, by key."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                counts[key] = math.prod(handle.get_slice(key).get_shape())
    return counts


# -- instrumenting the core ------------------------------------------------------------------------------
@contextlib.contextmanager
def rebound_in_core(name: str, wrap):
    """While open, every loaded `fishdip_peft` module that binds `name` (e.g. ``empirical_fisher``) binds
    `wrap(original)` instead, so the core's refresh calls the wrapper whichever module it lives in."""
    modules = [module for key, module in list(sys.modules.items())
               if key.startswith("fishdip_peft.") and module is not None and name in vars(module)]
    saved = [(module, getattr(module, name)) for module in modules]
    if not saved:
        raise LookupError(f"no fishdip_peft module binds {name!r}")
    for module, original in saved:
        setattr(module, name, wrap(original))
    try:
        yield
    finally:
        for module, original in saved:
            setattr(module, name, original)


# -- provenance -------------------------------------------------------------------------------------------
def core_sha256() -> str:
    """SHA-256 of the imported `fishdip_peft` sources, so rows measured on different core code can be told apart."""
    import fishdip_peft

    digest = hashlib.sha256()
    for file in sorted(Path(fishdip_peft.__file__).resolve().parent.glob("*.py")):
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def environment() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:  # EFFICIENCY_GIT_COMMIT: the commit a source snapshot without .git was exported from
        commit = os.environ.get("EFFICIENCY_GIT_COMMIT") or subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fishdip_peft", "benchmarks"],
                               capture_output=True, text=True, cwd=REPO_ROOT).stdout.splitlines()
    except OSError:
        commit, dirty = "", []
    env = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "torch_threads": torch.get_num_threads(), "cpu": cpu,
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "git_commit": commit,
        "uncommitted_files": [line[3:] for line in dirty], "core_sha256": core_sha256(),
        "source": os.environ.get("EFFICIENCY_SOURCE", str(REPO_ROOT)),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        env["memory_total_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    return env
