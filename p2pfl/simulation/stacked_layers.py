"""One forward pass of many copies of a model, written out as grouped convolutions and `bmm`.

`torch.func.vmap` runs N copies of a `Conv1d` as one grouped convolution on tensors laid out
`[batch, N x channels, length]`, and in that layout two of PyTorch's CPU kernels are slow:
max-pooling with indices (what autograd needs) and the weight gradient of a convolution with
one input channel. Measured on one core, 37 cnn1d nodes x 32 samples: max-pool forward 10 ms
where the same data with channels last takes 0.9; the first convolution's forward and backward
14 ms against 1.4; a whole training step ~55 ms against ~25.

`stacked_forward(model)` computes the same function for models built only from the layers
below, channels last (`[batch, length, N x channels]` in memory, a 2-d convolution of height 1),
where oneDNN's grouped convolutions and PyTorch's pooling run along contiguous channels. It
matches modules by exact type: anything else (another layer, a subclass with its own forward)
gives None and the caller keeps `vmap`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

from p2pfl.learning.models import Cnn1d

__all__ = ["StackedForward", "stacked_forward"]

# (parameters as named `[rows, *shape]` tensors, inputs `[rows, batch, *sample]`) -> logits
# `[rows, batch, classes]`: row r's model applied to row r's inputs.
StackedForward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]

# Layers that act on each value alone, whatever the layout (and never in place: see `_plan`).
_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity)


@dataclass
class _Acts:
    """Activations of `rows` models: `[rows, batch, *features]`, or with `conv` the grouped
    layout `[batch, rows x channels, 1, length]` with channels last in memory."""

    x: torch.Tensor
    rows: int
    conv: bool = False


_Step = Callable[[dict[str, torch.Tensor], _Acts], _Acts]


def stacked_forward(model: nn.Module) -> StackedForward | None:
    """`model`'s forward for many rows of parameters at once, or None if it has a layer (or a
    forward) this module does not write out."""
    steps = _plan(model, "")
    if steps is None:
        return None

    def forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        acts = _Acts(x, rows=x.shape[0])
        for step in steps:
            acts = step(params, acts)
        return _rows_first(acts).x

    return forward


def _plan(module: nn.Module, prefix: str) -> list[_Step] | None:
    kind = type(module)
    if kind is nn.Sequential:
        children = list(module.named_children())
        for k in range(len(children) - 1):
            # relu(max(a, b)) is max(relu(a), relu(b)), gradients too (the first largest
            # input gets them when it is > 0, else none does): pooling first halves ReLU's work.
            if type(children[k][1]) is nn.ReLU and type(children[k + 1][1]) is nn.MaxPool1d:
                children[k], children[k + 1] = children[k + 1], children[k]
        steps: list[_Step] = []
        for name, child in children:
            inner = _plan(child, f"{prefix}{name}.")
            if inner is None:
                return None
            steps += inner
        return steps
    if (
        isinstance(module, Cnn1d) and kind is Cnn1d
    ):  # its forward: one channel when samples are 1-d, features, head
        features = _plan(module.features, f"{prefix}features.")
        head = _plan(module.head, f"{prefix}head.")
        if features is None or head is None:
            return None
        return [_one_channel, *features, *head]
    if isinstance(module, nn.Conv1d) and kind is nn.Conv1d:
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None
        return [_conv(module, prefix)]
    if isinstance(module, nn.MaxPool1d) and kind is nn.MaxPool1d and not module.return_indices:
        return [_max_pool(module)]
    if kind is nn.Flatten and module.start_dim == 1 and module.end_dim == -1:
        return [_flatten]
    if kind is nn.Linear:
        return [_linear(prefix)]
    if kind in _ELEMENTWISE and not getattr(module, "inplace", False):
        return [lambda _params, acts: _Acts(module(acts.x), acts.rows, acts.conv)]
    return None


def _one_channel(_params: dict[str, torch.Tensor], acts: _Acts) -> _Acts:
    return _Acts(acts.x.unsqueeze(2), acts.rows) if acts.x.dim() == 3 else acts


def _grouped(acts: _Acts) -> _Acts:
    """`[rows, batch, channels, length]` -> `[batch, rows x channels, 1, length]`, channels last."""
    if acts.conv:
        return acts
    rows, batch, channels, length = acts.x.shape
    x = acts.x.permute(1, 3, 0, 2).contiguous().view(batch, length, rows * channels)
    return _Acts(x.permute(0, 2, 1).unsqueeze(2), rows, conv=True)


def _rows_first(acts: _Acts) -> _Acts:
    """The grouped layout back to `[rows, batch, channels, length]` (a view)."""
    if not acts.conv:
        return acts
    batch, _, _, length = acts.x.shape
    x = acts.x.view(batch, acts.rows, -1, length).permute(1, 0, 2, 3)
    return _Acts(x, acts.rows)


def _conv(module: nn.Conv1d, prefix: str) -> _Step:
    (stride,), (dilation,) = module.stride, module.dilation
    (padding,) = cast(tuple[int], module.padding)  # not "same" / "valid": see `_plan`
    groups = module.groups

    def step(params: dict[str, torch.Tensor], acts: _Acts) -> _Acts:
        acts = _grouped(acts)
        weight = params[prefix + "weight"]  # [rows, out, in / groups, kernel]
        bias = params.get(prefix + "bias")
        x = F.conv2d(
            acts.x,
            weight.reshape(-1, weight.shape[2], 1, weight.shape[3]),
            None if bias is None else bias.reshape(-1),
            stride=(1, stride),
            padding=(0, padding),
            dilation=(1, dilation),
            groups=acts.rows * groups,
        )
        return _Acts(x, acts.rows, conv=True)

    return step


def _max_pool(module: nn.MaxPool1d) -> _Step:
    def one(value: int | tuple[int, ...]) -> int:
        return value if isinstance(value, int) else value[0]

    kernel, padding, dilation = one(module.kernel_size), one(module.padding), one(module.dilation)
    stride = one(module.stride) if module.stride else kernel

    tiles = stride == kernel and padding == 0 and dilation == 1  # windows side by side

    def step(_params: dict[str, torch.Tensor], acts: _Acts) -> _Acts:
        acts = _grouped(acts)
        length = acts.x.shape[3]
        graded = torch.is_grad_enabled() and acts.x.requires_grad
        if tiles and not (module.ceil_mode and length % kernel) and (kernel == 2 or not graded):
            # Windows side by side: the maximum of each window's k-th positions, along the
            # channels that lie side by side in memory (`_tile_max`); under autograd only
            # windows of two have a gradient of their own (`_PairMax`).
            x = _tile_max(acts.x.permute(0, 2, 3, 1), kernel).permute(0, 3, 1, 2)
        else:
            x = F.max_pool2d(
                acts.x, (1, kernel), (1, stride), (0, padding), (1, dilation), module.ceil_mode
            )
        return _Acts(x, acts.rows, conv=True)

    return step


def _tile_max(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max-pooling of `[batch, 1, length, channels]` over side-by-side windows of `kernel`
    positions (the rest of `length` dropped), along the channels that lie side by side in
    memory: without autograd the maximum of each window's k-th positions (3x `max_pool2d`'s
    kernel, 2x an `amax` over the windows), with it `_PairMax` (windows of two only)."""
    windows = x.shape[2] // kernel
    if torch.is_grad_enabled() and x.requires_grad:
        assert kernel == 2, "under autograd only windows of two tile"
        return cast(torch.Tensor, _PairMax.apply(x))
    best = x[:, :, 0 : windows * kernel : kernel]
    for k in range(1, kernel):
        best = torch.maximum(best, x[:, :, k : windows * kernel : kernel])
    return best


class _PairMax(torch.autograd.Function):
    """`_tile_max` of windows of two, with `max_pool2d`'s gradient (a window's first largest
    value gets it; NaNs aside), from elementwise kernels that run along the channels: one
    cnn1d training step of 37 nodes spends 6.2 ms in `max_pool2d`'s forward and backward with
    indices (most of it the backward's zero fill and scatter) and ~1 ms here."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        end = x.shape[2] // 2 * 2
        first, second = x[:, :, 0:end:2], x[:, :, 1:end:2]
        best = torch.maximum(first, second)
        # 1.0 where the second value is strictly larger (it gets the gradient), else 0.0: a
        # float mask (a comparison into float, and the products below, are one fast pass).
        ctx.save_for_backward(torch.gt(second, first, out=torch.empty_like(best)))
        ctx.shape = x.shape
        return best

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (second,) = ctx.saved_tensors
        end = grad.shape[2] * 2
        out = grad.new_empty(ctx.shape)
        out[:, :, end:] = 0
        torch.mul(grad, second, out=out[:, :, 1:end:2])
        torch.sub(grad, out[:, :, 1:end:2], out=out[:, :, 0:end:2])  # exactly grad or 0
        return out


def _flatten(_params: dict[str, torch.Tensor], acts: _Acts) -> _Acts:
    acts = _rows_first(acts)
    return _Acts(acts.x.flatten(2), acts.rows)


def _linear(prefix: str) -> _Step:
    def step(params: dict[str, torch.Tensor], acts: _Acts) -> _Acts:
        acts = _rows_first(acts)
        if acts.x.dim() != 3:
            raise ValueError("a stacked Linear takes [rows, batch, features]")
        weight, bias = params[prefix + "weight"], params.get(prefix + "bias")
        if bias is None:
            return _Acts(torch.bmm(acts.x, weight.transpose(1, 2)), acts.rows)
        return _Acts(torch.baddbmm(bias.unsqueeze(1), acts.x, weight.transpose(1, 2)), acts.rows)

    return step
