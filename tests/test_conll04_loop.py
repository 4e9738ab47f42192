"""The CoNLL'04 training loop resumes mid-run and ends bit for bit where an uninterrupted run ends."""

from __future__ import annotations

import pytest
import torch

from benchmarks.conll04.authors import authors_num_regressing
from benchmarks.conll04.data import load_split
from benchmarks.conll04.loop import TrainSettings, train
from benchmarks.conll04.training import TanlEncoder, batch_losses
from benchmarks.conll04.data import load_types
from benchmarks.methods import METHODS, build_method
from tests.test_conll04_runner import tiny_llama, word_level_tokenizer

SENTENCES = load_split("train")[:5]


def _model(method: str, **overrides):
    tokenizer = word_level_tokenizer()
    model = tiny_llama(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    return build_method(method, model, **overrides), TanlEncoder(tokenizer, False, load_types())


def _trained_state(prepared):
    return {n: p.detach().clone() for n, p in prepared.model.named_parameters()}


CASES = {
    "fishdip-authors": ("fishdip", dict(update_every=2, num_regressing=2, density=0.05),
                        dict(optimizer="adafactor", lr_schedule="linear", rescore=True, learning_rate=1e-2)),
    "fixed-fish-authors": ("fixed-fish", dict(update_every=2, num_regressing=2, density=0.05),
                           dict(optimizer="adafactor", lr_schedule="linear", rescore=True, learning_rate=1e-2)),
    "lora-adamw": ("lora", dict(), dict(optimizer="adamw", lr_schedule="linear", learning_rate=1e-2)),
}


@pytest.mark.parametrize("case", CASES)
def test_a_resumed_run_ends_bit_for_bit_where_an_uninterrupted_run_ends(tmp_path, case):
    method, overrides, settings = CASES[case]
    settings = TrainSettings(steps=6, seed=0, batch_size=3, **settings)
    fishdip = METHODS[method].fishdip_adapter

    model, encoder = _model(method, **overrides)
    whole = train(model, encoder, SENTENCES, settings=settings, batch_losses=batch_losses, progress=False)
    expected = _trained_state(model)

    first, encoder = _model(method, **overrides)
    part = train(first, encoder, SENTENCES, settings=settings, batch_losses=batch_losses, checkpoint_dir=tmp_path,
                 checkpoint_seconds=0, progress=False, stop_after=3)
    assert part["interrupted"] and len(part["log"]) == 3
    resumed, encoder = _model(method, **overrides)  # a fresh process would rebuild the model like this
    rest = train(resumed, encoder, SENTENCES, settings=settings, batch_losses=batch_losses, checkpoint_dir=tmp_path,
                 checkpoint_seconds=0, progress=False)
    assert rest["resumed_from"] == 3
    strip = lambda log: [{k: v for k, v in e.items() if k != "seconds"} for e in log]  # noqa: E731
    assert strip(rest["log"]) == strip(whole["log"])
    for name, tensor in _trained_state(resumed).items():
        assert torch.equal(tensor, expected[name]), name
    if fishdip:
        assert torch.equal(resumed.model.base_model.mask, model.model.base_model.mask)


def test_a_checkpoint_from_other_settings_is_refused(tmp_path):
    model, encoder = _model("lora")
    settings = TrainSettings(steps=4, seed=0, batch_size=3, learning_rate=1e-2)
    train(model, encoder, SENTENCES, settings=settings, batch_losses=batch_losses, checkpoint_dir=tmp_path,
          checkpoint_seconds=0, progress=False, stop_after=1)
    other, encoder = _model("lora")
    with pytest.raises(ValueError, match="other settings"):
        train(other, encoder, SENTENCES, settings=TrainSettings(steps=4, seed=0, batch_size=3, learning_rate=3e-2),
              batch_losses=batch_losses, checkpoint_dir=tmp_path, progress=False)


def test_early_stop_after_the_loss_stays_below_the_threshold():
    model, encoder = _model("lora")
    settings = TrainSettings(steps=8, seed=0, batch_size=3, learning_rate=1e-2, early_stop_loss=100.0,
                             early_stop_patience=3)
    result = train(model, encoder, SENTENCES, settings=settings, batch_losses=batch_losses, progress=False)
    assert result["stopped_early_at"] == 3 and len(result["log"]) == 3


def test_the_authors_number_of_regressing_samples():
    # min(max(int(0.1 x batches per epoch), 3), 25), at most N - 1; batches of 32 sentences.
    assert [authors_num_regressing(n) for n in (9, 46, 92, 922)] == [3, 3, 3, 3]
    assert authors_num_regressing(32 * 100) == 10 and authors_num_regressing(32 * 1000) == 25
    assert authors_num_regressing(3) == 2
