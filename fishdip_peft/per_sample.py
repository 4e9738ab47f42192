"""Per-sample squared gradients from one batched forward and backward pass (the Fisher's fast path).

For n samples in one batch, the backward of the sum of their losses gives, at the output of every
module that owns a scored parameter, the gradient G (n, ..., out); the module's input X is kept from the
forward. Sample i's gradient of that module's parameters is then a product of its own slices, squared
into the score at once:

* `nn.Linear` weight: G_iᵀ X_i; transformers' `Conv1D` (weight (in, out)): X_iᵀ G_i; bias: G_i summed
  over the tokens;
* `nn.Embedding`: the rows of G_i summed per token id (no (vocab, hidden) tensor per sample);
* any other module (norms, custom layers): the vector-Jacobian product of the module alone, re-run on
  sample i's input.

Autograd computes no weight gradient (every weight stays frozen), and the matrix products run on whole
batches instead of one sample at a time. A weight used by several calls (a tied LM head, T5's shared
embedding) has its per-sample gradient summed over the calls before it is squared.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

# Per-sample weight gradients are formed for this many entries at a time (chunks of samples).
_CHUNK_ENTRIES = 1 << 24
# Linear weights: per-sample gradients are formed and squared this many entries at a time (fits in cache).
_BLOCK_ENTRIES = 1 << 18


class CannotBatch(Exception):
    """The model's structure does not allow the batched computation (the caller uses one pass per sample)."""


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    if _is_conv1d(module):
        return "conv1d"
    return "generic"


class _Call:
    """One call of a module that owns scored parameters: its inputs, and later its output gradient."""

    def __init__(self, module: nn.Module, owned: list[tuple[str, nn.Parameter]], args: tuple, kwargs: dict):
        self.module, self.owned, self.kind = module, owned, _kind(module)
        self.args, self.kwargs = args, kwargs

    def sample_grads(self, attr: str, grad_out: torch.Tensor, samples: slice, replay: Callable) -> torch.Tensor:
        """Per-sample gradients of parameter `attr` for `samples`, dense, shape (len, *param.shape) (not for
        embeddings, whose gradients are sparse: `_embedding_rows`)."""
        x = self.args[0]
        g = grad_out[samples]
        if self.kind in ("linear", "conv1d") and attr == "weight":
            g2 = g.reshape(g.shape[0], -1, g.shape[-1])
            x2 = x[samples].reshape(g.shape[0], -1, x.shape[-1]).to(g2.dtype)
            if self.kind == "linear":
                return torch.bmm(g2.transpose(1, 2), x2)
            return torch.bmm(x2.transpose(1, 2), g2)
        if self.kind in ("linear", "conv1d") and attr == "bias":
            return g.reshape(g.shape[0], -1, g.shape[-1]).float().sum(1)
        return replay(self, attr, grad_out, samples)


def _embedding_rows(module: nn.Embedding, ids: torch.Tensor, grad: torch.Tensor):
    """One sample's embedding gradient as (distinct ids, their rows), as `embedding_backward` computes it."""
    uniq, inverse, counts = ids.reshape(-1).unique(return_inverse=True, return_counts=True)
    rows = torch.zeros((uniq.numel(), grad.shape[-1]), dtype=torch.float32, device=grad.device)
    rows.index_add_(0, inverse, grad.reshape(-1, grad.shape[-1]).float())
    if module.scale_grad_by_freq:
        rows /= counts.unsqueeze(1)
    if module.padding_idx is not None:
        rows[uniq == module.padding_idx] = 0
    return uniq, rows


class BatchedSquaredGradients:
    """Adds Σ_i (∇_θ ℓ_i)² to `scores` for the n samples of one batched pass (see module doc).

    Use as a context manager around the forward and the backward of `sum(per-sample losses)`; the model's
    weights must not require grad. `autocast` (a context manager or None) also applies to re-run modules.
    """

    def __init__(self, model: nn.Module, parameters: Sequence[nn.Parameter], scores: Sequence[torch.Tensor],
                 num_samples: int, autocast: Any = None):
        self.model, self.n = model, num_samples
        self.autocast = autocast or contextlib.nullcontext
        self.score_of = {id(p): s for p, s in zip(parameters, scores)}
        self.calls_of: dict[int, list[_Call]] = {}  # parameter -> its calls in this forward
        self.pending: dict[int, list[tuple[_Call, str, torch.Tensor]]] = {}
        self._handles: list = []

    def __enter__(self):
        wanted = set(self.score_of)
        for module in self.model.modules():
            owned = [(a, p) for a, p in module._parameters.items() if p is not None and id(p) in wanted]
            if owned:
                self._handles.append(module.register_forward_hook(self._record(owned), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        # The gradient hooks on the outputs refer back to this object through the autograd graph, a cycle
        # Python's collector cannot see: drop the scores and the saved inputs here.
        self._handles, self.score_of, self.calls_of, self.pending = [], {}, {}, {}
        return False

    def _record(self, owned):
        def hook(module, args, kwargs, output):
            if not isinstance(output, torch.Tensor) or output.dim() == 0 or output.shape[0] != self.n:
                raise CannotBatch(f"{type(module).__name__} returns no tensor batched on dim 0")
            if not args or not isinstance(args[0], torch.Tensor) or args[0].shape[0] != self.n:
                raise CannotBatch(f"{type(module).__name__} takes no tensor batched on dim 0")
            call = _Call(module, owned, args, kwargs)
            for _, param in owned:
                self.calls_of.setdefault(id(param), []).append(call)
            replaced = None
            if not output.requires_grad:  # nothing upstream requires grad: make the gradient reach here
                leaf = output.detach().requires_grad_()
                output, replaced = leaf, leaf.clone()
            output.register_hook(lambda grad: self._on_grad(call, grad))
            return replaced

        return hook

    def _on_grad(self, call: _Call, grad: torch.Tensor) -> None:
        for attr, param in call.owned:
            key = id(param)
            waiting = self.pending.setdefault(key, [])
            waiting.append((call, attr, grad))
            if len(waiting) == len(self.calls_of[key]):
                self._square_into(key, waiting)
                del self.pending[key]

    def finish(self) -> None:
        """Square the parameters some of whose calls got no gradient (their output did not reach the loss)."""
        for key, waiting in self.pending.items():
            self._square_into(key, waiting)
        self.pending = {}

    def _square_into(self, key: int, contributions: list) -> None:
        score = self.score_of[key]
        lookups = [(call, grad) for call, _, grad in contributions if call.kind == "embedding"]
        products = [c for c in contributions if c[0].kind != "embedding"]
        if not products:  # embeddings only: sparse, just the rows of each sample's tokens
            for i in range(self.n):
                ids, rows = zip(*(_embedding_rows(call.module, call.args[0][i], grad[i]) for call, grad in lookups))
                uniq, inverse = torch.cat(ids).unique(return_inverse=True)
                summed = torch.zeros((uniq.numel(), score.shape[-1]), dtype=torch.float32, device=score.device)
                summed.index_add_(0, inverse, torch.cat(rows))
                score.index_add_(0, uniq, summed * summed)
            return
        if len(products) == 1 and not lookups and products[0][0].kind in ("linear", "conv1d") \
                and products[0][1] == "weight":
            call, _, grad = products[0]
            _square_product_into(score, call, grad)
            return
        chunk = max(1, _CHUNK_ENTRIES // max(score.numel(), 1))
        for start in range(0, self.n, chunk):
            samples = slice(start, min(start + chunk, self.n))
            total = None
            for call, attr, grad in products:
                part = call.sample_grads(attr, grad, samples, self._replay).float()
                total = part if total is None else total.add_(part)
            for row, i in enumerate(range(samples.start, samples.stop)):
                for call, grad in lookups:  # a tied embedding adds its rows to the product's gradient
                    ids, rows = _embedding_rows(call.module, call.args[0][i], grad[i])
                    total[row].index_add_(0, ids, rows)
                score.addcmul_(total[row], total[row])

    def _replay(self, call: _Call, attr: str, grad_out: torch.Tensor, samples: slice) -> torch.Tensor:
        """Per-sample gradients of a parameter of any module: its vector-Jacobian product on each sample."""
        grads = []
        for i in range(*samples.indices(self.n)):
            args = tuple(_row(a, i, self.n) for a in call.args)
            kwargs = {k: _row(v, i, self.n) for k, v in call.kwargs.items()}
            params = {a: p.detach().requires_grad_() for a, p in call.owned}
            with torch.enable_grad(), self.autocast(), _parameters_replaced(call.module, params):
                out = call.module.forward(*args, **kwargs)  # the module alone, without its hooks
            (grad,) = torch.autograd.grad(out, [params[attr]], grad_out[i:i + 1].to(out.dtype), allow_unused=True)
            grads.append(torch.zeros_like(params[attr]) if grad is None else grad)
        return torch.stack(grads)


def _square_product_into(score: torch.Tensor, call: _Call, grad: torch.Tensor) -> None:
    """Σ_i (G_iᵀ X_i)² for a Linear weight (X_iᵀ G_i for Conv1D), a block of weight rows at a time, so each
    block of per-sample gradients is squared while it is still in cache."""
    n, x = grad.shape[0], call.args[0]
    g = grad.reshape(n, -1, grad.shape[-1])
    x = x.reshape(n, -1, x.shape[-1]).to(g.dtype)
    left, right = (g, x) if call.kind == "linear" else (x, g)  # weight rows follow `left`'s last dim
    left = left.transpose(1, 2)
    rows = max(1, _BLOCK_ENTRIES // (n * right.shape[-1]))
    for start in range(0, left.shape[1], rows):
        block = torch.bmm(left[:, start:start + rows], right).float()
        score[start:start + rows].add_(block.square_().sum(0))


@contextlib.contextmanager
def _parameters_replaced(module: nn.Module, tensors: dict[str, torch.Tensor]):
    saved = {name: module._parameters[name] for name in tensors}
    module._parameters.update(tensors)
    try:
        yield
    finally:
        module._parameters.update(saved)


def _row(value: Any, i: int, n: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value[i:i + 1].detach()
    return value
