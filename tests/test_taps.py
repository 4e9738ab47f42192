"""fishdip_peft.taps: selected-entry gradients from output gradients, checked against dense autograd."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

from fishdip_peft.taps import (
    selected_bias_grad,
    selected_embedding_grad,
    selected_linear_grad,
    split_positions,
    tap_output,
)
from tests.models import tiny_llama


def assert_rel_close(got, want, rel=1e-6):
    """max |got - want| <= rel * max |want| (fp32 sums in a different order are not bit-equal)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = want.abs().max().clamp(min=1e-30)
    err = (got - want).abs().max()
    assert err <= rel * scale, f"relative error {float(err / scale):.2e} > {rel:.0e}"


def random_positions(numel, density=0.3, generator=None):
    k = max(1, int(numel * density))
    return torch.randperm(numel, generator=generator)[:k].sort().values


class Recorder:
    """A sink that keeps the output gradient and the inputs, and counts its calls."""

    def __init__(self):
        self.calls, self.delta, self.inputs = 0, None, None

    def __call__(self, delta, inputs):
        self.calls += 1
        self.delta, self.inputs = delta, inputs


def tapped(module, values):
    """Freeze `module` and tap its output; returns the recorder."""
    module.requires_grad_(False)
    recorder = Recorder()
    module.register_forward_hook(lambda m, args, out: tap_output(out, args, values, recorder))
    return recorder


def dense_grads(module, x, probe):
    """The dense weight (and bias) gradients of sum(module(x) * probe), on a trainable copy."""
    dense = copy.deepcopy(module).requires_grad_(True)
    (dense(x) * probe).sum().backward()
    return dense


@pytest.mark.parametrize("shape", [(7, 5), (2, 9, 5)], ids=["2d", "3d_batch"])
def test_linear_with_bias(shape):
    torch.manual_seed(0)
    layer, values = nn.Linear(5, 6), torch.zeros(1, requires_grad=True)
    recorder = tapped(layer, values)
    x = torch.randn(*shape)
    probe = torch.randn(*shape[:-1], 6)
    (layer(x) * probe).sum().backward()
    assert recorder.calls == 1 and values.grad is None
    dense = dense_grads(layer, x, probe)
    index = random_positions(layer.weight.numel())
    rows, cols = split_positions(index, layer.weight.shape)
    got = selected_linear_grad(recorder.inputs[0], recorder.delta, rows, cols)
    assert_rel_close(got, dense.weight.grad.view(-1)[index])
    bias_positions = torch.tensor([0, 2, 5])
    assert_rel_close(selected_bias_grad(recorder.delta, bias_positions), dense.bias.grad[bias_positions])


def test_linear_input_gradient_unchanged():
    torch.manual_seed(0)
    layer, values = nn.Linear(5, 6), torch.zeros(1, requires_grad=True)
    tapped(layer, values)
    x, probe = torch.randn(3, 4, 5, requires_grad=True), torch.randn(3, 4, 6)
    (layer(x) * probe).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (layer(x_ref) * probe).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)


def test_conv1d_transposed():
    torch.manual_seed(0)
    layer, values = Conv1D(6, 5), torch.zeros(1, requires_grad=True)  # weight (in=5, out=6)
    recorder = tapped(layer, values)
    x, probe = torch.randn(2, 4, 5), torch.randn(2, 4, 6)
    out = layer(x)
    out.mul_(1.0)  # the tapped output may still be modified in place (it is a view here)
    (out * probe).sum().backward()
    dense = dense_grads(layer, x, probe)
    index = random_positions(layer.weight.numel())
    rows, cols = split_positions(index, layer.weight.shape)
    got = selected_linear_grad(recorder.inputs[0], recorder.delta, rows, cols, transposed=True)
    assert_rel_close(got, dense.weight.grad.view(-1)[index])
    assert_rel_close(selected_bias_grad(recorder.delta, torch.arange(6)), dense.bias.grad)


def test_unsorted_and_repeated_positions():
    torch.manual_seed(0)
    x, delta = torch.randn(11, 5), torch.randn(11, 7)
    full = delta.T @ x
    rows, cols = torch.tensor([6, 0, 3, 3, 0, 6]), torch.tensor([4, 1, 2, 2, 0, 4])
    assert_rel_close(selected_linear_grad(x, delta, rows, cols), full[rows, cols])


@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_embedding_repeated_ids_and_padding_idx(scale_grad_by_freq):
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, padding_idx=2, scale_grad_by_freq=scale_grad_by_freq)
    values = torch.zeros(1, requires_grad=True)
    recorder = tapped(emb, values)
    ids = torch.tensor([[1, 2, 2, 7], [7, 7, 0, 2]])  # repeats, padding, rows 3..6, 8, 9 absent
    probe = torch.randn(2, 4, 4)
    (emb(ids) * probe).sum().backward()
    assert recorder.calls == 1
    dense = dense_grads(emb, ids, probe)
    index = random_positions(emb.weight.numel(), density=0.6)
    rows, cols = split_positions(index, emb.weight.shape)
    assert bool((rows == 2).any()) and bool((rows == 5).any())
    got = selected_embedding_grad(
        recorder.inputs[0], recorder.delta, rows, cols, emb.num_embeddings, emb.padding_idx, scale_grad_by_freq
    )
    want = dense.weight.grad.view(-1)[index]
    assert_rel_close(got, want)
    assert bool((got[rows == 2] == 0).all()) and bool((got[rows == 5] == 0).all())
    negative = selected_embedding_grad(ids, recorder.delta, rows, cols, 10, -8, scale_grad_by_freq)
    assert_rel_close(negative, want)


def test_tied_embedding_and_lm_head_add_up():
    torch.manual_seed(0)
    emb, head = nn.Embedding(12, 5), nn.Linear(5, 12, bias=False)
    head.weight = emb.weight
    emb.requires_grad_(False)
    values = torch.zeros(1, requires_grad=True)
    index = random_positions(emb.weight.numel(), density=0.5)
    rows, cols = split_positions(index, emb.weight.shape)
    parts = []
    emb.register_forward_hook(lambda m, a, out: tap_output(out, a, values, lambda d, i: parts.append(
        selected_embedding_grad(i[0], d, rows, cols, 12))))
    head.register_forward_hook(lambda m, a, out: tap_output(out, a, values, lambda d, i: parts.append(
        selected_linear_grad(i[0], d, rows, cols))))
    ids, targets = torch.randint(0, 12, (3, 6)), torch.randint(0, 12, (3, 6))

    def loss_of(emb_, head_):
        hidden = torch.tanh(emb_(ids))
        return nn.functional.cross_entropy(head_(hidden).view(-1, 12), targets.view(-1))

    loss_of(emb, head).backward()
    assert len(parts) == 2
    ref_emb = copy.deepcopy(emb).requires_grad_(True)
    ref_head = nn.Linear(5, 12, bias=False)
    ref_head.weight = ref_emb.weight
    loss_of(ref_emb, ref_head).backward()
    assert_rel_close(parts[0] + parts[1], ref_emb.weight.grad.view(-1)[index])


def test_bf16_activations():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8).to(torch.bfloat16)
    emb = nn.Embedding(20, 16).to(torch.bfloat16)
    values = torch.zeros(1, requires_grad=True)
    rec_layer, rec_emb = tapped(layer, values), tapped(emb, values)
    ids = torch.randint(0, 20, (4, 32))
    probe = torch.randn(4, 32, 8, dtype=torch.bfloat16)
    (layer(emb(ids)) * probe).sum().backward()
    x, delta = rec_layer.inputs[0], rec_layer.delta
    assert x.dtype == delta.dtype == torch.bfloat16
    index = random_positions(layer.weight.numel())
    rows, cols = split_positions(index, layer.weight.shape)
    got = selected_linear_grad(x, delta, rows, cols)
    assert got.dtype == torch.float32
    # exact w.r.t. the fp32 product of the (exactly upcast) bf16 activations
    fp32 = (delta.float().reshape(-1, 8).T @ x.float().reshape(-1, 16)).view(-1)[index]
    assert_rel_close(got, fp32)
    # and within bf16 rounding of bf16 dense autograd
    dense = dense_grads(nn.Sequential(emb, layer), ids, probe)
    torch.testing.assert_close(got, dense[1].weight.grad.float().view(-1)[index], rtol=2e-2, atol=2e-2)
    e_index = random_positions(emb.weight.numel())
    e_rows, e_cols = split_positions(e_index, emb.weight.shape)
    e_got = selected_embedding_grad(rec_emb.inputs[0], rec_emb.delta, e_rows, e_cols, 20)
    e_fp32 = torch.zeros(20, 16).index_add_(0, ids.view(-1), rec_emb.delta.float().view(-1, 16)).view(-1)[e_index]
    assert_rel_close(e_got, e_fp32)
    torch.testing.assert_close(e_got, dense[0].weight.grad.float().view(-1)[e_index], rtol=2e-2, atol=2e-2)
    assert_rel_close(selected_bias_grad(delta, torch.arange(8)), delta.float().sum((0, 1)))


def test_empty_positions():
    x, delta, none = torch.randn(3, 4), torch.randn(3, 5), torch.empty(0, dtype=torch.int64)
    for got in (
        selected_linear_grad(x, delta, none, none),
        selected_linear_grad(x.T, delta.T, none, none, transposed=True),
        selected_embedding_grad(torch.tensor([1, 2, 3]), delta, none, none, 10),
        selected_bias_grad(delta, none),
    ):
        assert got.shape == (0,) and got.dtype == torch.float32
    # and no tokens at all: zeros
    got = selected_linear_grad(torch.randn(0, 4), torch.randn(0, 5), torch.tensor([1]), torch.tensor([2]))
    assert got.tolist() == [0.0]


def test_tap_is_identity_and_inactive_without_grad():
    values = torch.zeros(1, requires_grad=True)
    calls = []
    out = torch.randn(3, 4)
    with torch.no_grad():
        assert tap_output(out, (out,), values, lambda d, i: calls.append(1)) is out
    assert tap_output(out, (out,), torch.zeros(1), lambda d, i: calls.append(1)) is out
    tapped_out = tap_output(out, (out, "note", None), values, lambda d, i: calls.append(i))
    assert tapped_out is out and tapped_out.requires_grad and tapped_out.grad_fn.name().startswith("SelectedGradTap")
    tapped_out.sum().backward()
    assert len(calls) == 1 and calls[0][1:] == ("note", None) and calls[0][0] is not None
    assert values.grad is None


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_sink_called_once_under_checkpoint(use_reentrant):
    torch.manual_seed(0)
    stem, block = nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 6))
    values = torch.zeros(1, requires_grad=True)
    recorders = [tapped(stem, values), tapped(block[0], values), tapped(block[2], values)]
    x, probe = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    # x does not require grad; the stem's tap (through `values`) makes the checkpoint's input need one,
    # as the embedding's tap does in a transformers model (reentrant checkpointing needs that)
    h = stem(x)
    assert h.requires_grad
    y = checkpoint(lambda h: block(h) + h, h, use_reentrant=use_reentrant)
    (y * probe).sum().backward()
    assert [r.calls for r in recorders] == [1, 1, 1]
    dense_stem, dense = copy.deepcopy(stem).requires_grad_(True), copy.deepcopy(block).requires_grad_(True)
    h_ref = dense_stem(x)
    ((dense(h_ref) + h_ref) * probe).sum().backward()
    for rec, ref in zip(recorders, (dense_stem, dense[0], dense[2])):
        index = random_positions(ref.weight.numel())
        rows, cols = split_positions(index, ref.weight.shape)
        assert_rel_close(selected_linear_grad(rec.inputs[0], rec.delta, rows, cols), ref.weight.grad.view(-1)[index])
        assert_rel_close(selected_bias_grad(rec.delta, torch.arange(6)), ref.bias.grad[:6])


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["plain", "reentrant_checkpointing"])
def test_tiny_llama_end_to_end(gradient_checkpointing):
    model = tiny_llama(seed=0)
    reference = copy.deepcopy(model)
    model.requires_grad_(False)
    values = torch.zeros(1, requires_grad=True)
    generator = torch.Generator().manual_seed(1)
    collected, calls, positions = {}, {}, {}

    def add(name, index, grad):
        calls[name] = calls.get(name, 0) + 1
        collected[name] = collected.get(name, 0) + grad

    embed = model.get_input_embeddings()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or module is embed:
            weight_name = "model.embed_tokens" if module.weight is embed.weight else name
            if weight_name not in positions:
                positions[weight_name] = random_positions(module.weight.numel(), 0.2, generator)
            index = positions[weight_name]
            rows, cols = split_positions(index, module.weight.shape)
            if module is embed:
                def sink(delta, inputs, rows=rows, cols=cols, key=weight_name, index=index):
                    add(key, index, selected_embedding_grad(inputs[0], delta, rows, cols, embed.num_embeddings,
                                                            embed.padding_idx))
            else:
                def sink(delta, inputs, rows=rows, cols=cols, key=weight_name, index=index):
                    add(key, index, selected_linear_grad(inputs[0], delta, rows, cols))
            module.register_forward_hook(lambda m, a, out, sink=sink: tap_output(out, a, values, sink))
    assert model.lm_head.weight is embed.weight and len(positions) == 1 + 2 * 7

    ids = torch.randint(0, 64, (2, 12), generator=generator)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.train()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    reference(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    assert calls.pop("model.embed_tokens") == 2 and set(calls.values()) == {1}  # tied: embedding + lm_head
    ref_params = dict(reference.named_parameters())
    for name, index in positions.items():
        want = ref_params[name + ".weight"].grad.view(-1)[index]
        assert_rel_close(collected[name], want)
    assert all(p.grad is None for p in model.parameters()) and values.grad is None
