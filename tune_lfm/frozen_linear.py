"""Frozen linear layers through oneDNN on CPU: the same products at about twice MKL's speed where MKL keeps to AVX2.

PyTorch's CPU build sends every fp32 matrix product to MKL, which on AMD processors runs its AVX2 kernels even when
the CPU has AVX-512; oneDNN, also inside PyTorch, takes fp32 products only when reduced precision is allowed
(`torch.backends.mkldnn.matmul.fp32_precision`), which tune_lfm never allows. oneDNN's fp32 inner product does use
AVX-512 there (benchmarks/RESULTS.md: 84-96 GFLOP/s with MKL, 193-220 with oneDNN on the tiny model's shapes, one
core of an AMD EPYC). In a LoRA trial every base weight is frozen, so each is copied once into oneDNN's layout, with
its transpose for the backward pass (the gradient of the input only: a frozen weight has none), and the layer's
products run there. The adapter's own small matrices, which change every step, stay with PyTorch.

`linears_on_onednn(model)` does this for one block of code (a trial's training) and puts every layer back on exit,
so weights changed between blocks (a merged adapter) are copied afresh; measurements (`measured_on_onednn`) put every
linear layer there, trainable or not, since they change no weight: a base model loaded for its atlas and the same
weights inside a trial then multiply alike, to the bit. Inside a block, `weight_product` / `weight_t_product` give
code that multiplies by a layer's weight directly (the lean LM head) the same copies. Nothing changes off the CPU,
for half-precision weights, or where this PyTorch lacks the operator or gives different products (checked once per
process).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

from .forwards import restored_forwards

TOLERANCE = 1e-4
"""Largest relative difference from `torch.nn.functional.linear` accepted by the check (fp32 sums taken in another
order differ by about 1e-6)."""

_packed: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
"""id(weight) -> (weight, W and W.T in oneDNN's layout), for the weights of the layers inside an active block."""


def _onednn_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T (+ bias) for `packed` = W in oneDNN's layout; x of any leading shape."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ops.mkldnn._linear_pointwise(rows if rows.is_contiguous() else rows.contiguous(), packed, bias,
                                             "none", [], "")
    return out.reshape(*x.shape[:-1], out.shape[-1])


class FrozenLinearProduct(torch.autograd.Function):
    """y = x @ W.T + b with W and b frozen: the backward pass gives the input's gradient alone, dy @ W, computed as a
    product with the packed transpose."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, packed_t: torch.Tensor, bias: torch.Tensor | None):
        ctx.packed_t = packed_t
        return _onednn_product(x, packed, bias)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return _onednn_product(grad_out, ctx.packed_t, None), None, None, None


def _copies(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    entry = _packed.get(id(weight))
    return entry[1:] if entry is not None and entry[0] is weight else None


def weight_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T, through oneDNN when `weight` belongs to a layer inside an active block."""
    copies = _copies(weight)
    return x @ weight.t() if copies is None else _onednn_product(x, copies[0], None)


def weight_t_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight, likewise."""
    copies = _copies(weight)
    return x @ weight if copies is None else _onednn_product(x, copies[1], None)


@functools.cache
def onednn_products_work() -> bool:
    """Whether this PyTorch has oneDNN's linear operator and it gives F.linear's products and input gradients."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(48, 40, generator=generator), torch.randn(48, generator=generator)
    x = torch.randn(3, 5, 40, generator=generator, requires_grad=True)
    with torch.enable_grad():  # the first caller may be a measurement, under no_grad
        try:
            y = FrozenLinearProduct.apply(x, weight.to_mkldnn(), weight.t().contiguous().to_mkldnn(), bias)
            (grad,) = torch.autograd.grad(y.sum(), x)
        except RuntimeError:
            return False
        reference = torch.nn.functional.linear(x, weight, bias)
        (reference_grad,) = torch.autograd.grad(reference.sum(), x)
    return all(torch.allclose(a, b, rtol=TOLERANCE, atol=TOLERANCE * b.abs().max().item())
               for a, b in ((y, reference), (grad, reference_grad)))


def _linears(model, frozen_only: bool) -> list[torch.nn.Linear]:
    """The model's plain fp32 CPU linear layers whose weight (and bias) no optimizer updates, or all of them, leaving
    out those an enclosing block already put on oneDNN."""
    return [module for module in model.modules() if type(module) is torch.nn.Linear
            and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"
            and not (frozen_only and any(p is not None and p.requires_grad for p in (module.weight, module.bias)))
            and _copies(module.weight) is None]


def _onednn_forward(packed: torch.Tensor, packed_t: torch.Tensor, bias: torch.Tensor | None):
    return lambda x: FrozenLinearProduct.apply(x, packed, packed_t, bias)


@contextlib.contextmanager
def linears_on_onednn(model, frozen_only: bool = True) -> Iterator[bool]:
    """Within the block, `model`'s frozen fp32 CPU linear layers (with `frozen_only=False`, all of them: for a block
    that changes no weight) compute through oneDNN; yields whether any layer of `model` does (True too when an
    enclosing block put them there)."""
    layers = _linears(model, frozen_only)
    if not layers or not onednn_products_work():
        yield any(_copies(module.weight) is not None for module in model.modules()
                  if type(module) is torch.nn.Linear)
        return
    with restored_forwards(layers):
        try:
            for layer in layers:
                weight = layer.weight.detach()
                packed, packed_t = weight.to_mkldnn(), weight.t().contiguous().to_mkldnn()
                _packed[id(layer.weight)] = (layer.weight, packed, packed_t)
                layer.forward = _onednn_forward(packed, packed_t, None if layer.bias is None else layer.bias.detach())
            yield True
        finally:
            for layer in layers:
                _packed.pop(id(layer.weight), None)


def measured_on_onednn(function):
    """`function(model, ...)`, a measurement, run without gradients and with every linear layer of `model` on
    oneDNN: each measurement takes the same kernels whoever calls it (the atlas's kept hidden states are compared
    with a trial's to the bit)."""

    @functools.wraps(function)
    def wrapper(model, *args, **kwargs):
        with torch.no_grad(), linears_on_onednn(model, frozen_only=False):
            return function(model, *args, **kwargs)

    return wrapper
