"""The Fisher's batched passes equal one forward and backward per sample (same scores, so the same mask)."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fishdip_peft import fisher
from fishdip_peft.fisher import collate_samples, empirical_fisher, trim_right_padding
from fishdip_peft.per_sample import CannotBatch

from .models import causal_batch, seq2seq_batch, tiny_bert_classifier, tiny_llama, tiny_t5


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=32)).eval()


def rows(batch: dict, trim: bool) -> list[dict]:
    n = batch["labels"].shape[0]
    samples = [{k: v[i:i + 1] for k, v in batch.items()} for i in range(n)]
    return [trim_right_padding(s) for s in samples] if trim else samples


def classification_batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (4, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 2])}


def one_at_a_time(model, samples, params):
    scores = [torch.zeros(p.shape) for p in params]
    flags = [p.requires_grad for p in params]
    fisher._one_at_a_time(model, samples, params, scores, fisher.nullcontext)
    for p, flag in zip(params, flags):
        p.requires_grad_(flag)
        p.grad = None
    return scores


CASES = {
    "llama (tied embedding)": (tiny_llama, lambda: rows(causal_batch(3), trim=True)),
    "gpt2 (Conv1D, tied)": (tiny_gpt2, lambda: rows(causal_batch(4), trim=True)),
    "t5 (shared embedding, seq2seq)": (tiny_t5, lambda: rows(seq2seq_batch(5), trim=False)),
    "bert classifier": (tiny_bert_classifier, lambda: rows(classification_batch(6), trim=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_batched_scores_equal_per_sample_passes(case, monkeypatch):
    build, make_samples = CASES[case]
    model, samples = build(), make_samples()
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(False)
    expected = one_at_a_time(model, samples, params)
    used = []
    original = fisher._batched
    monkeypatch.setattr(fisher, "_batched", lambda *a: (used.append(True), original(*a)))
    got = empirical_fisher(model, samples, params, mean=False, batch_size=len(samples))
    assert used, "the batched pass was not taken"
    for p, e, g in zip(params, expected, got):
        assert torch.allclose(g, e, rtol=1e-5, atol=1e-10 + 1e-6 * float(e.abs().max())), p.shape
    assert all(not p.requires_grad and p.grad is None for p in params)
    assert not model.training


def test_unbatchable_samples_fall_back_to_one_pass_each():
    model = tiny_llama()
    samples = rows(causal_batch(2), trim=True)
    samples[0] = dict(samples[0])
    del samples[0]["attention_mask"]
    assert collate_samples(samples) is None
    params = list(model.parameters())
    expected = one_at_a_time(model, samples, params)
    got = empirical_fisher(model, samples, params, mean=False, batch_size=4)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_batches_of_two_equal_one_batch_and_one_pass_per_sample():
    model = tiny_llama()
    samples = rows(causal_batch(8, batch=5), trim=True)
    params = list(model.parameters())
    single = empirical_fisher(model, samples, params, mean=False)  # the default: one pass per sample
    assert all(torch.equal(a, b) for a, b in zip(single, one_at_a_time(model, samples, params)))
    for size in (2, 5):
        got = empirical_fisher(model, samples, params, mean=False, batch_size=size)
        for g, e in zip(got, single):
            assert torch.allclose(g, e, rtol=1e-5, atol=1e-6 * float(e.abs().max()) + 1e-10)


def test_collation_pads_only_inert_keys():
    a = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
         "labels": torch.tensor([[-100, 6, 7]])}
    b = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
         "labels": torch.tensor([[8]])}
    batch = collate_samples([a, b])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    no_mask = [{k: v for k, v in s.items() if k != "attention_mask"} for s in (a, b)]
    assert collate_samples(no_mask) is None  # padding ids without a mask would change an encoder's result


def test_a_loss_that_is_not_the_mean_of_sample_losses_is_not_batched():
    model = tiny_llama()
    samples = rows(causal_batch(1), trim=True)

    class Weighted(torch.nn.Module):  # a model whose loss weights samples differently
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **batch):
            out = self.inner(**batch)
            out.loss = out.loss * 2
            return out

    wrapped = Weighted(model)
    params = list(model.parameters())
    with pytest.raises(CannotBatch):
        fisher._batched(wrapped, collate_samples(samples), len(samples), params,
                        [torch.zeros(p.shape) for p in params], fisher.nullcontext)
    expected = one_at_a_time(wrapped, samples, params)
    got = empirical_fisher(wrapped, samples, params, mean=False, batch_size=len(samples))
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_bf16_autocast_fisher_is_close_and_accumulates_in_float32():
    model = tiny_llama()
    samples = rows(causal_batch(7), trim=True)
    params = list(model.parameters())
    exact = empirical_fisher(model, samples, params)
    low = empirical_fisher(model, samples, params, autocast_dtype=torch.bfloat16, batch_size=len(samples))
    assert all(s.dtype == torch.float32 for s in low)
    flat_exact, flat_low = torch.cat([s.flatten() for s in exact]), torch.cat([s.flatten() for s in low])
    assert not torch.equal(flat_exact, flat_low)
    assert torch.corrcoef(torch.stack([flat_exact, flat_low]))[0, 1] > 0.99


def test_fisher_dtype_and_batch_size_are_validated_and_used_by_the_refresh(monkeypatch):
    from peft import get_peft_model

    from fishdip_peft import FishDipConfig, forward_with_per_sample_losses

    with pytest.raises(ValueError, match="fisher_dtype must be one of"):
        FishDipConfig(fisher_dtype="int8")
    with pytest.raises(ValueError, match="fisher_batch_size must be a positive integer"):
        FishDipConfig(fisher_batch_size=0)
    seen = []
    original = fisher.empirical_fisher

    def spy(*args, **kwargs):
        seen.append((kwargs.get("autocast_dtype"), kwargs.get("batch_size")))
        return original(*args, **kwargs)

    import fishdip_peft.stepping as stepping

    monkeypatch.setattr(stepping, "empirical_fisher", spy)
    for precision, size, expected in (("float32", 1, (None, 1)), ("bfloat16", 3, (torch.bfloat16, 3))):
        model = get_peft_model(tiny_llama(), FishDipConfig(density=0.05, fisher_dtype=precision,
                                                           fisher_batch_size=size))
        batch = causal_batch(0)
        _, losses = forward_with_per_sample_losses(model, batch)
        assert model.step(losses, batch)
        assert seen[-1] == expected
        assert int(model.base_model.mask.sum()) == model.base_model.sparse_adapters["default"].k


def test_a_batched_pass_leaves_nothing_alive():
    import gc

    from fishdip_peft.per_sample import BatchedSquaredGradients

    model = tiny_llama()
    samples = rows(causal_batch(1), trim=True)
    empirical_fisher(model, samples, list(model.parameters()), batch_size=len(samples))
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, BatchedSquaredGradients)]
