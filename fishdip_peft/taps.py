"""Gradients of selected weight entries only, from the output gradient of a frozen module.

FISH-DIP trains K chosen entries of the model's weights. Letting autograd produce each weight's
dense gradient and then picking K entries costs a full `out x in x T` product per layer (T tokens).
Here the weights stay frozen (`requires_grad=False`), so autograd only propagates input gradients,
and a forward hook wraps the module's output in `SelectedGradTap`, an identity autograd Function
that also keeps the module's input(s). Its backward receives delta = dL/d(output) and hands it,
with the saved inputs, to a `sink`, which computes just the wanted entries:

* Linear (y = x @ W.T + b): dL/dW[r, c] = sum_t delta[t, r] * x[t, c], one length-T dot product per
  selected entry, i.e. K*T multiply-adds instead of out*in*T. It runs as a sampled dense-dense
  matmul (`torch.sparse.sampled_addmm` with a CSR pattern of the selected entries); no (out, in)
  tensor is ever formed. transformers' `Conv1D` (y = x @ W + b, W (in, out)) is the same with the
  roles of x and delta swapped (`transposed=True`).
* Embedding (y[t] = W[ids[t]]): delta is summed per distinct id in the batch (T*hidden adds) and
  the selected entries are read from those sums; no (vocab, hidden) tensor is formed.
* Bias: delta summed over the tokens, read at the selected positions.

All sums are accumulated in float32 (float64 for float64 inputs), also for bf16/fp16 activations.
The tap passes the trainable `values` vector as an extra input so that the output requires grad
even when nothing upstream does; it gets no gradient from the tap (the sink decides where the
selected gradients go).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "SelectedGradTap",
    "selected_bias_grad",
    "selected_embedding_grad",
    "selected_linear_grad",
    "split_positions",
    "tap_output",
]

Sink = Callable[[Tensor, tuple], None]

# The CSR "beta" warning is emitted once per process (a C++ warn-once latch); spend it here, silently,
# so that the first backward does not print it.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.sparse_csr_tensor(torch.zeros(2, dtype=torch.int64), torch.zeros(0, dtype=torch.int64),
                            torch.zeros(0), size=(1, 1), check_invariants=False)


def _accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def split_positions(index: Tensor, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Flat positions in a 2-D weight of `shape` -> (rows, cols) along its two dimensions."""
    cols = shape[1]
    return torch.div(index, cols, rounding_mode="floor"), index % cols


def selected_linear_grad(x: Tensor, delta: Tensor, rows: Tensor, cols: Tensor, transposed: bool = False) -> Tensor:
    """dL/dW at (rows[k], cols[k]) for y = x @ W.T (+ b); with `transposed`, for y = x @ W (+ b)
    (transformers' Conv1D, W of shape (in, out)).

    x (..., in) and delta (..., out) have the same leading dims. Returns a float32 tensor (float64
    for float64 inputs) of shape (K,): sum_t delta[t, rows[k]] * x[t, cols[k]] (Linear) or
    sum_t x[t, rows[k]] * delta[t, cols[k]] (Conv1D). Positions may be in any order; the work is
    K*T multiply-adds and the temporaries are O(T*(in+out) + K), never (out, in).
    """
    dtype = _accumulation_dtype(x, delta)
    k = rows.numel()
    if k == 0:
        return torch.zeros(0, dtype=dtype, device=delta.device)
    left, right = (x, delta) if transposed else (delta, x)  # grad[r, c] = sum_t left[t, r] * right[t, c]
    left = left.reshape(-1, left.shape[-1]).to(dtype)
    right = right.reshape(-1, right.shape[-1]).to(dtype)
    n_rows, n_cols = left.shape[1], right.shape[1]
    rows = rows.to(left.device, torch.int64).reshape(-1)
    cols = cols.to(left.device, torch.int64).reshape(-1)
    if left.shape[0] == 0:
        return torch.zeros(k, dtype=dtype, device=left.device)
    order = None
    key = rows * n_cols + cols
    if k > 1 and not bool((key[1:] >= key[:-1]).all()):
        order = torch.argsort(key)
        rows, cols = rows[order], cols[order]
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=left.device)
    torch.cumsum(torch.bincount(rows, minlength=n_rows), 0, out=crow[1:])
    pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(k, dtype=dtype, device=left.device),
                                      size=(n_rows, n_cols), check_invariants=False)
    picked = torch.sparse.sampled_addmm(pattern, left.T, right, beta=0.0).values()
    if order is not None:
        picked = torch.empty_like(picked).index_copy_(0, order, picked)
    return picked


def selected_embedding_grad(
    ids: Tensor,
    delta: Tensor,
    rows: Tensor,
    cols: Tensor,
    num_embeddings: int,
    padding_idx: Optional[int] = None,
    scale_grad_by_freq: bool = False,
) -> Tensor:
    """dL/dW at (rows[k], cols[k]) for an embedding y[t] = W[ids[t]]: sum over the tokens t with
    ids[t] == rows[k] of delta[t, cols[k]] (zero for rows absent from the batch and for
    `padding_idx`; divided by the row's count in the batch with `scale_grad_by_freq`, as torch does).

    ids (...) and delta (..., hidden). Returns float32 (float64 for float64 delta), shape (K,).
    Work: T*hidden adds to sum delta per distinct id, then K look-ups; no (vocab, hidden) tensor.
    """
    dtype = _accumulation_dtype(delta)
    k = rows.numel()
    if k == 0:
        return torch.zeros(0, dtype=dtype, device=delta.device)
    ids = ids.reshape(-1).to(delta.device, torch.int64)
    delta = delta.reshape(ids.numel(), -1)
    rows = rows.to(delta.device, torch.int64).reshape(-1)
    cols = cols.to(delta.device, torch.int64).reshape(-1)
    if ids.numel() == 0:
        return torch.zeros(k, dtype=dtype, device=delta.device)
    present, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(present.numel(), delta.shape[1], dtype=dtype, device=delta.device)
    sums.index_add_(0, inverse, delta.to(dtype))
    if scale_grad_by_freq:
        sums /= counts.unsqueeze(1).to(dtype)
    slot = torch.searchsorted(present, rows).clamp_(max=present.numel() - 1)
    found = present[slot] == rows
    if padding_idx is not None:
        if padding_idx < 0:
            padding_idx += num_embeddings
        found &= rows != padding_idx
    return torch.where(found, sums[slot, cols], torch.zeros((), dtype=dtype, device=delta.device))


def selected_bias_grad(delta: Tensor, positions: Tensor) -> Tensor:
    """dL/db at `positions` for y = ... + b: delta (..., out) summed over all leading dims."""
    dtype = _accumulation_dtype(delta)
    if positions.numel() == 0:
        return torch.zeros(0, dtype=dtype, device=delta.device)
    total = delta.reshape(-1, delta.shape[-1]).sum(0, dtype=dtype)
    return total.index_select(0, positions.to(total.device, torch.int64).reshape(-1))


class SelectedGradTap(torch.autograd.Function):
    """Identity on a module's output; its backward calls `sink(delta, inputs)` with the output
    gradient and the module inputs saved at forward, and passes delta on unchanged.

    apply(output, values, sink, *inputs). `values` (a tensor that requires grad) makes the output
    require grad even when nothing upstream does; it receives no gradient. The output is returned as
    the same tensor, marked modified in place, so no copy is made and later in-place ops on it stay
    legal. Non-tensor inputs are passed to the sink as given.
    """

    @staticmethod
    def forward(ctx, output, values, sink, *inputs):
        ctx.sink = sink
        ctx.is_tensor = [isinstance(a, Tensor) for a in inputs]
        ctx.others = [a for a in inputs if not isinstance(a, Tensor)]
        ctx.save_for_backward(*(a for a in inputs if isinstance(a, Tensor)))
        ctx.mark_dirty(output)
        return output

    @staticmethod
    def backward(ctx, delta):
        tensors, others = iter(ctx.saved_tensors), iter(ctx.others)
        inputs = tuple(next(tensors) if is_tensor else next(others) for is_tensor in ctx.is_tensor)
        with torch.no_grad():
            ctx.sink(delta, inputs)
        return (delta, None, None) + (None,) * len(inputs)


def tap_output(output: Tensor, inputs: Union[Tensor, tuple], values: Tensor, sink: Sink) -> Tensor:
    """What a forward hook returns to have `sink(delta, inputs)` called once per backward through
    `output` (delta = dL/d(output)). Without grad mode, or when neither `output` nor `values`
    requires grad, `output` is returned untouched and the sink is never called.

    Under reentrant checkpointing (`use_reentrant=True`) the checkpointed segment is only
    backpropagated if one of its inputs requires grad (in a transformers model, the embedding's tap
    provides that); non-reentrant checkpointing has no such condition.

    Example, for a frozen nn.Linear and trainable entries at flat positions `index`:

        rows, cols = split_positions(index, linear.weight.shape)
        def sink(delta, inputs):
            values.grad[sl] += selected_linear_grad(inputs[0], delta, rows, cols)
        linear.register_forward_hook(lambda m, args, out: tap_output(out, args, values, sink))
    """
    if not torch.is_grad_enabled() or not (values.requires_grad or output.requires_grad):
        return output
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    if output.is_leaf and output.requires_grad:
        # e.g. an embedding output made a leaf by `enable_input_require_grads` hooked in before this tap:
        # it cannot be marked modified in place, so the tap works on a copy.
        output = output.clone()
    return SelectedGradTap.apply(output, values, sink, *inputs)
