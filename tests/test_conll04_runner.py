"""The CoNLL'04 runner end to end on a tiny random Llama with a word-level tokenizer built in code.

The pipeline test runs the real command line (each run in its own subprocess) for FISH-DIP and LoRA
on 4 training sentences for 2 steps, scoring 3 test sentences; the report test uses fixture JSONs.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.conll04 import report, run, training
from benchmarks.conll04.data import load_split, load_types
from benchmarks.conll04.tanl import format_target
from benchmarks.conll04.training import (
    IGNORE_INDEX,
    PROTOCOL,
    TanlEncoder,
    batch_losses,
    batch_stream,
    default_steps,
    fishdip_schedule,
    generate,
)

REQUIRED_FIELDS = (
    "method", "train_fraction", "seed", "entity_f1", "relation_f1", "model", "steps", "learning_rate",
    "learning_rate_source", "train_seconds", "eval_seconds", "peak_memory_bytes", "trainable_params",
    "checkpoint_bytes", "commit", "versions", "cpu", "train_log", "hyperparameters", "predictions", "run_spec",
)
SPECIAL = ["<pad>", "<unk>", "<eos>"]


@functools.lru_cache(maxsize=1)
def word_level_tokenizer():
    """A whitespace word-level tokenizer over every CoNLL'04 word and the TANL markup."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    types = load_types()
    words = set()
    for split in ("train", "dev", "test"):
        for sentence in load_split(split):
            words.update(sentence.tokens)
            words.update(format_target(sentence, types).split())
    vocab = {token: i for i, token in enumerate(SPECIAL + sorted(words))}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<eos>")


def tiny_llama(vocab_size: int, pad_id: int, eos_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = word_level_tokenizer()
    model = tiny_llama(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipeline(tiny_model_dir, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    lr_file = results / "lr_selection.json"  # absent: runs use the documented defaults
    argv = ["--methods", "fishdip,lora", "--fractions", "0.004", "--seeds", "0", "--model", str(tiny_model_dir),
            "--steps", "2", "--batch-size", "2", "--eval-limit", "3", "--max-new-tokens", "12",
            "--results-dir", str(results),
            "--lr-file", str(lr_file), "--no-progress", "--no-report"]
    assert run.main(argv) == 0
    return results, lr_file, argv


def test_budget_and_fishdip_schedule() -> None:
    assert [default_steps(f) for f in (0.01, 0.05, 0.1)] == [30, 40, 80]
    assert fishdip_schedule(40) == {"update_every": 6, "num_regressing": 15}
    assert fishdip_schedule(2)["update_every"] == 1


def test_batch_stream_covers_each_epoch() -> None:
    stream = batch_stream(5, 2, seed=3)
    batches = [next(stream) for _ in range(5)]
    flat = [i for b in batches for i in b]
    assert all(len(b) == 2 for b in batches)
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    assert batches == [next(s) for s in [batch_stream(5, 2, seed=3)] for _ in range(5)]


def test_encoder_masks_prompt_and_ends_with_eos() -> None:
    tokenizer = word_level_tokenizer()
    encoder = TanlEncoder(tokenizer, encoder_decoder=False, types=load_types())
    sentence = load_split("train")[0]
    example = encoder.train_example(sentence)
    prompt = encoder.prompt(sentence)
    assert example.input_ids[: len(prompt)] == prompt
    assert example.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert example.labels[len(prompt):] == example.input_ids[len(prompt):]
    assert example.labels[-1] == tokenizer.eos_token_id
    batch = encoder.collate([example, encoder.train_example(load_split("train")[1])])
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def tiny_t5(vocab_size: int, pad_id: int, eos_id: int):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=vocab_size, d_model=16, d_ff=32, d_kv=4, num_layers=2, num_heads=4,
                      decoder_start_token_id=pad_id, pad_token_id=pad_id, eos_token_id=eos_id)
    return T5ForConditionalGeneration(config)


@pytest.mark.parametrize("architecture", ["llama", "t5"])
def test_unpadded_batch_losses_match_one_padded_forward(architecture) -> None:
    from fishdip_peft import forward_with_per_sample_losses

    tokenizer = word_level_tokenizer()
    factory = tiny_llama if architecture == "llama" else tiny_t5
    model = factory(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id).eval()
    encoder = TanlEncoder(tokenizer, encoder_decoder=architecture == "t5", types=load_types())
    examples = [encoder.train_example(s) for s in load_split("train")[:4]]
    assert len({len(e.input_ids) for e in examples}) > 1  # the padded batch has padding

    def loss_and_grads(compute):
        model.zero_grad(set_to_none=True)
        loss, losses = compute()
        loss.backward()
        return loss.detach(), losses.detach(), [p.grad.clone() for p in model.parameters()]

    def padded_forward():
        outputs, losses = forward_with_per_sample_losses(model, encoder.collate(examples))
        return outputs.loss, losses

    padded = loss_and_grads(padded_forward)
    unpadded = loss_and_grads(lambda: batch_losses(model, encoder, examples))
    torch.testing.assert_close(unpadded[0], padded[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unpadded[1], padded[1], rtol=1e-5, atol=1e-6)
    for got, expected in zip(unpadded[2], padded[2]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_batched_left_padded_generation_matches_one_by_one(tiny_model_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    encoder = TanlEncoder(AutoTokenizer.from_pretrained(tiny_model_dir), False, load_types())
    sentences = load_split("test")[:3]
    assert len({len(encoder.prompt(s)) for s in sentences}) > 1  # padding is exercised
    batched = generate(model, encoder, sentences, batch_size=3, progress=False, max_new_tokens_cap=16)
    assert batched == generate(model, encoder, sentences, batch_size=1, progress=False, max_new_tokens_cap=16)
    assert all(0 < len(text.split()) <= 16 for text in batched)


def test_seq2seq_model_runs_end_to_end(tmp_path) -> None:
    """`--model` takes an encoder-decoder (T5): trained on sentence -> target, decoded, scored, saved."""
    from benchmarks.conll04.training import execute_run

    tokenizer = word_level_tokenizer()
    tiny_t5(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    record = execute_run({
        "method": "fishdip", "train_fraction": 0.004, "seed": 0, "steps": 2, "learning_rate": 1e-3,
        "learning_rate_source": "test", "model": str(tmp_path), "eval_split": "test", "eval_limit": 3,
        "eval_max_new_tokens": 12, "batch_size": 2, "eval_batch_size": 2, "progress": False,
        "method_overrides": {"update_every": 1, "num_regressing": 2},
    })
    assert record["encoder_decoder"] is True and record["mask_refreshes"] == 2
    assert len(record["predictions"]) == 3 and all(len(text.split()) <= 12 for text in record["predictions"])
    assert all(math.isfinite(entry["loss"]) for entry in record["train_log"])
    assert record["checkpoint_bytes"] > 0


def test_pipeline_writes_complete_json(pipeline, tiny_model_dir) -> None:
    results, _, _ = pipeline
    for method in ("fishdip", "lora"):
        record = json.loads((results / f"{method}-0.004-0.json").read_text())
        missing = [f for f in REQUIRED_FIELDS if f not in record]
        assert not missing, f"{method}: missing {missing}"
        assert record["method"] == method and record["train_fraction"] == 0.004 and record["seed"] == 0
        assert record["model"] == str(tiny_model_dir) and record["steps"] == 2
        assert record["learning_rate"] == run.DEFAULT_LR[method]
        assert record["learning_rate_source"].startswith("default")
        assert record["eval_sentences"] == 3 and len(record["predictions"]) == 3
        assert record["train_sentences"] == 4
        assert 0.0 <= record["entity_f1"] <= 100.0 and 0.0 <= record["relation_f1"] <= 100.0
        assert record["trainable_params"] > 0 and record["checkpoint_bytes"] > 0 and record["peak_memory_bytes"] > 0
        assert record["versions"]["torch"] and record["versions"]["peft"]
        assert record["cpu"].endswith(torch.backends.cpu.get_cpu_capability())
        assert record["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
        log = record["train_log"]
        assert [e["step"] for e in log] == [1, 2]
        assert all(len(e["per_sample_losses"]) == 2 == len(e["sample_ids"]) for e in log)
    fish = json.loads((results / "fishdip-0.004-0.json").read_text())
    assert fish["hyperparameters"]["method"]["update_every"] == 1
    assert fish["mask_refreshes"] == 2 and all("mask_changed" in e for e in fish["train_log"])
    assert "adapter_model.safetensors" in fish["checkpoint_files"]


def test_resume_skips_finished_runs(pipeline, monkeypatch, capsys) -> None:
    results, _, argv = pipeline
    before = {p.name: p.read_bytes() for p in results.glob("*-0.004-0.json")}

    def no_worker(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(run, "run_worker", no_worker)
    assert run.main(argv + ["--no-report"]) == 0
    assert "skipped" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in results.glob("*-0.004-0.json")} == before

    # A changed configuration (here the learning rate) is not "finished".
    args = run.build_parser().parse_args(argv + ["--lr", "lora=0.5"])
    args.results_dir, args.methods, args.fractions, args.seeds = results, ["lora"], [0.004], [0]
    (path, spec), = run.plan_runs(args, "test")
    assert run.finished(path, spec) == (False, "configuration changed")


def fixture_record(method: str, fraction: float, seed: int, entity: float, relation: float) -> dict:
    log = [{"step": s, "loss": 1.0 / s, "sample_ids": [0, 1], "per_sample_losses": [1.0 / s, 2.0 / s],
            "mask_changed": s % 2 == 1} for s in range(1, 5)]
    return {"method": method, "train_fraction": fraction, "seed": seed, "entity_f1": entity, "relation_f1": relation,
            "model": "tiny", "steps": 4, "batch_size": 2, "train_sentences": 4, "learning_rate": 1e-3,
            "learning_rate_source": "default",
            "train_seconds": 60.0, "eval_seconds": 30.0, "peak_memory_bytes": 2_000_000_000,
            "trainable_params": 1000, "total_params": 100_000, "checkpoint_bytes": 8_000,
            "eval_split": "test", "eval_sentences": 288, "final_train_loss": 0.25, "commit": "abc",
            "hyperparameters": {"method": {"density": 0.01, "update_every": 1, "num_regressing": 15}},
            "versions": {}, "train_log": log, "command": "python -m benchmarks.conll04.run --fixture",
            "protocol": PROTOCOL}


def test_report_mean_and_std_from_fixtures(tmp_path) -> None:
    fixtures = [("fishdip", 0.05, 0, 50.0, 20.0), ("fishdip", 0.05, 1, 52.0, 23.0), ("fishdip", 0.05, 2, 54.0, 26.0),
                ("lora", 0.05, 0, 60.0, 10.0), ("fishdip", 0.01, 0, 30.0, 5.0), ("fixed-fish", 0.01, 0, 31.0, 5.04)]
    for method, fraction, seed, entity, relation in fixtures:
        (tmp_path / run.result_name(method, fraction, seed)).write_text(
            json.dumps(fixture_record(method, fraction, seed, entity, relation)))
    (tmp_path / "not-a-run.json").write_text("[1, 2]")
    lora = tmp_path / run.result_name("lora", 0.05, 0)
    lora.write_text(json.dumps({**json.loads(lora.read_text()), "cpu": "Example CPU, AVX2"}))
    stale = {**fixture_record("full-ft", 0.05, 0, 99.0, 99.0), "protocol": PROTOCOL - 1}
    (tmp_path / run.result_name("full-ft", 0.05, 0)).write_text(json.dumps(stale))
    path = report.write_report(tmp_path, lr_file=tmp_path / "missing.json")
    text = path.read_text()
    assert "Full fine-tuning" not in report.summary_table(report.load_results(tmp_path))
    assert "1 run(s) made with an earlier version" in text
    fish_row = next(line for line in text.splitlines() if line.startswith("| 5% | FISH-DIP |"))
    assert "| 3 | 52.0 ± 2.0 | 23.0 ± 3.0 |" in fish_row
    assert fish_row.endswith("| 0.292 |")  # losses 1/s over 4 steps; 4 sentences, batch 2: mean of steps 3 and 4
    lora_row = next(line for line in text.splitlines() if line.startswith("| 5% | LoRA |"))
    assert "| 1 | 60.0 | 10.0 |" in lora_row and "| 1.0 min (A) |" in lora_row and "| 1.0 min (?) |" in fish_row
    assert "- Processors: A = Example CPU, AVX2, 1 runs; ? = not recorded" in text
    assert "FISH-DIP loses to LoRA (entity F1 52.0 vs 60.0)" in text
    assert "FISH-DIP loses to FISH mask (fixed) (entity F1 30.0 vs 31.0)" in text  # relation 5.0 vs 5.04 ties
    assert "python -m benchmarks.conll04.run --quick" in text
    for figure in ("figure2.png", "figure4.png"):
        assert (tmp_path / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_from_pipeline_flags_partial_test_set(pipeline) -> None:
    results, lr_file, _ = pipeline
    assert report.main(["--results-dir", str(results), "--lr-file", str(lr_file), "--quiet"]) == 0
    text = (results / "REPORT.md").read_text()
    assert "FISH-DIP" in text and "LoRA" in text and "†" in text
    assert (results / "figure2.png").is_file() and (results / "figure4.png").is_file()


def test_fishdip_exploration_plan_and_report(tmp_path) -> None:
    lr_file = tmp_path / "lr_selection.json"
    args = run.build_parser().parse_args(["--results-dir", str(tmp_path), "--lr-file", str(lr_file)])
    assert run.plan_exploration(args, "test") == []  # no selected rate yet
    lr_file.write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "methods": {"fishdip": {"selected": 0.003}}}))
    plan = run.plan_exploration(args, "test")
    assert len(plan) == len(run.FISHDIP_VARIANTS)
    for path, spec in plan:
        assert path.parent.name == "dev_exploration" and spec["method"] == "fishdip"
        assert spec["eval_split"] == "dev" and spec["learning_rate"] == 0.003 and len(spec["method_overrides"]) == 1
    assert {k for _, spec in plan for k in spec["method_overrides"]} == {"density", "update_every", "num_regressing"}

    (tmp_path / "lr_selection").mkdir()
    (tmp_path / "dev_exploration").mkdir()
    reference = {**fixture_record("fishdip", 0.05, 0, 40.0, 10.0), "learning_rate": 0.003, "eval_sentences": 80}
    (tmp_path / "lr_selection" / "fishdip-lr0.003.json").write_text(json.dumps(reference))
    variant = {**reference, "entity_f1": 45.0, "relation_f1": 12.5}
    variant["hyperparameters"] = {"method": {"density": 0.02, "update_every": 1, "num_regressing": 15}}
    (tmp_path / "dev_exploration" / "fishdip-density0.02.json").write_text(json.dumps(variant))
    rows = [line for line in report.exploration_section(tmp_path) if line.startswith("| 0.0")]
    assert rows[0].startswith("| 0.01 | 1 | 15 | 40.0 | 10.0 |")
    assert rows[1].startswith("| 0.02 | 1 | 15 | 45.0 | 12.5 |")


def test_device_choice_and_a_clear_error_without_cuda(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training.resolve_device(None) == training.resolve_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA device.*--device cpu"):
        training.resolve_device("cuda:1")
    with pytest.raises(SystemExit, match="no CUDA device"):
        run.main(["--device", "cuda", "--results-dir", str(tmp_path), "--methods", "lora"])
    assert list(tmp_path.iterdir()) == []


def test_thread_environment_spins_only_on_idle_cores(monkeypatch) -> None:
    assert isinstance(run.cpus_idle(seconds=0.05), bool)
    monkeypatch.setattr(run, "cpus_idle", lambda: True)
    assert run.thread_environment({}) == {"GOMP_SPINCOUNT": "6000"}
    monkeypatch.setattr(run, "cpus_idle", lambda: False)
    assert run.thread_environment({}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert run.thread_environment({"OMP_WAIT_POLICY": "ACTIVE"}) == {"OMP_WAIT_POLICY": "ACTIVE"}  # the caller's
