"""The written-out forward of many models (`stacked_layers`) against `vmap` of the module's own
forward: same logits, same per-node gradients; layers it does not cover fall back to vmap."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from p2pfl.learning.models import build_model
from p2pfl.simulation.stacked import StackedModels
from p2pfl.simulation.stacked_layers import _tile_max, stacked_forward


def odd_convnet() -> nn.Module:
    """Every option the written-out layers take: strides, dilation, padding, groups, no bias,
    pooling windows that overlap or run past the end, ReLU before and after a pool."""
    return nn.Sequential(
        nn.Conv1d(2, 6, kernel_size=3, stride=2, padding=3, dilation=2, groups=2, bias=False),
        nn.Tanh(),
        nn.MaxPool1d(3, stride=2, padding=1, ceil_mode=True),
        nn.Conv1d(6, 4, kernel_size=2),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Flatten(),
        nn.Linear(4 * 3, 7, bias=False),
        nn.LeakyReLU(0.1),
        nn.Linear(7, 3),
    )


def pool_of_three() -> nn.Module:
    """Side-by-side pooling windows of three (`max_pool2d` under autograd, `_tile_max` without)."""
    return nn.Sequential(
        nn.Conv1d(1, 4, kernel_size=3), nn.ReLU(), nn.MaxPool1d(3), nn.Flatten(), nn.Linear(28, 3)
    )


MODELS = {
    "cnn1d": (lambda: build_model("cnn1d", (24,), 3, seed=0), (24,)),
    "cnn1d, two channels": (lambda: build_model("cnn1d", (2, 16), 3, seed=0), (2, 16)),
    "odd convnet": (odd_convnet, (2, 23)),
    "pool of three": (pool_of_three, (1, 23)),
}


def stack(model: nn.Module, rows: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """`rows` different copies of `model`'s parameters: named `[rows, *shape]` and flat."""
    torch.manual_seed(1)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).repeat(rows, 1)
    flat = flat + 0.1 * torch.randn_like(flat)
    params, k = {}, 0
    for name, p in model.named_parameters():
        params[name] = flat[:, k : k + p.numel()].view(rows, *p.shape)
        k += p.numel()
    return params, flat


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_and_gradients_equal_vmap_of_the_modules_forward(name: str) -> None:
    build, sample = MODELS[name]
    model = build()
    forward = stacked_forward(model)
    assert forward is not None
    rows, batch = 5, 9
    params, _ = stack(model, rows)
    x = torch.randn(rows, batch, *sample)
    y = torch.randint(0, 3, (rows, batch))

    def loss(p: dict[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xs,)), ys)

    want_logits = vmap(lambda p, xs: functional_call(model, p, (xs,)))(params, x)
    want_grads = vmap(grad(loss))(params, x, y)
    with torch.no_grad():  # side-by-side pooling windows take a max without indices here
        torch.testing.assert_close(forward(params, x), want_logits, rtol=1e-5, atol=1e-6)
    leaves = {key: value.detach().requires_grad_() for key, value in params.items()}
    logits = forward(leaves, x)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-6)
    per_row = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
    total = per_row.view(rows, batch).mean(dim=1).sum()  # rows' parameters are disjoint
    got = torch.autograd.grad(total, list(leaves.values()))
    for key, g in zip(leaves, got, strict=True):
        torch.testing.assert_close(g, want_grads[key], rtol=1e-4, atol=1e-6, msg=key)


class Scaled(nn.Sequential):
    """A Sequential with its own forward: matched by exact type, so not written out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Conv1d(1, 2, 3), nn.Dropout(0.5), nn.Flatten(), nn.Linear(2 * 6, 3)),
        nn.Sequential(nn.Conv1d(1, 2, 3, padding="same"), nn.Flatten(), nn.Linear(16, 3)),
        nn.Sequential(nn.Conv1d(1, 2, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(12, 3)),
        Scaled(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6, 3)),
    ],
    ids=["dropout", "padding-same", "inplace-relu", "own-forward"],
)
def test_layers_it_does_not_write_out_are_left_to_vmap(model: nn.Module) -> None:
    assert stacked_forward(model) is None


def test_a_model_the_written_out_forward_gets_wrong_trains_through_vmap() -> None:
    """Every layer here is covered, but a Linear on 3-d activations (before the Flatten) is
    not: the check on the first samples sees it and training goes through vmap, as the
    module's own forward says."""
    model = nn.Sequential(
        nn.Conv1d(1, 3, 3), nn.ReLU(), nn.Linear(6, 4), nn.Flatten(), nn.Linear(12, 3)
    )
    assert stacked_forward(model) is not None
    models = StackedModels(model, 3)
    x, y = torch.randn(12, 1, 8), torch.randint(0, 3, (12,))
    shards = [range(0, 4), range(4, 8), range(8, 12)]
    models.set_data(x.numpy(), y.numpy(), [list(s) for s in shards], seeds=[0, 1, 2])
    before = models.flat.clone()
    models.fit(torch.arange(3), epochs=1, batch_size=4, lr=0.1, momentum=0.0)
    assert models._fast is None
    for i, shard in enumerate(shards):  # each node took one SGD step on its own four samples
        params = {k: v[0].requires_grad_() for k, v in models.views(before[i : i + 1]).items()}
        loss = F.cross_entropy(functional_call(model, params, (x[shard],)), y[shard])
        grads = torch.autograd.grad(loss, list(params.values()))
        steps = zip(params.values(), grads, strict=True)
        want = torch.cat([(p - 0.1 * g).detach().reshape(-1) for p, g in steps])
        torch.testing.assert_close(models.flat[i], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", [1, 2, 3])
@pytest.mark.parametrize("length", [12, 13])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_pooling_side_by_side_windows_equals_max_pool(kernel: int, length: int, ties: bool) -> None:
    """The written-out pooling of side-by-side windows (`_tile_max`) against `max_pool2d` on
    the same channels-last tensor: the same values; for windows of two under autograd
    (`_PairMax`) the same gradient too, the first largest value of a window taking it when
    values tie (rounded inputs tie often), a tail shorter than a window getting none."""
    torch.manual_seed(kernel * 100 + length)
    x = torch.randn(3, 8, 1, length).to(memory_format=torch.channels_last)
    if ties:
        x = x.round()
    want_x = x.clone().requires_grad_()
    want = F.max_pool2d(want_x, (1, kernel), (1, kernel))
    with torch.no_grad():
        assert torch.equal(_tile_max(x.permute(0, 2, 3, 1), kernel).permute(0, 3, 1, 2), want)
    if kernel != 2:
        return  # `_max_pool` takes max_pool2d under autograd for other windows
    got_x = x.clone().requires_grad_()
    got = _tile_max(got_x.permute(0, 2, 3, 1), kernel).permute(0, 3, 1, 2)
    assert torch.equal(got, want)
    upstream = torch.randn_like(want)
    (want_grad,) = torch.autograd.grad(want, want_x, upstream)
    (got_grad,) = torch.autograd.grad(got, got_x, upstream)
    assert torch.equal(got_grad, want_grad)
