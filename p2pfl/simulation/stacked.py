"""Many copies of one model trained together: stacked parameters, `torch.func`, one SGD each.

The batched engine's training half (`p2pfl.simulation.batched`). Node i's parameters are row i
of one `[N, P]` tensor; `torch.func.functional_call` runs the model on each row's views and
`torch.func.vmap(torch.func.grad(...))` takes every node's gradient on its own minibatch in one
call. Models with convolutions built from common layers (cnn1d among them) go through the same
forward written out as grouped convolutions with channels last instead (`stacked_layers`: 2x
faster than vmap's layout on CPU), with autograd's gradient of the rows' summed losses. Each
node keeps its own SGD momentum buffer, so a step is `TorchLearner`'s SGD (momentum, weight
decay, FedProx's proximal term) done for all nodes at once.

Different shard sizes: a node's shard is a row of global sample indices padded to the largest
shard. Each epoch every node draws the order of its own samples from its own generator, as
`torch.randperm` in a shuffled `DataLoader` does (`make_loaders`: seeded the same, the same
batches as the node engine's learner), and step k takes positions [kB, (k+1)B) of that order,
masked past the node's size, the last batch short. Only nodes with samples left in the epoch
compute and step at all; the others wait (their momentum does not move them either), exactly
as a per-node loop that stopped earlier.

Nodes are trained in chunks small enough for a chunk's tensors to stay in the CPU's caches
through its steps (`chunk_rows`), nodes of like shard sizes together (a step is as wide as the
longest batch in it), and chunks (like evaluation's runs of nodes) go to as many threads as
torch has cores, one intra-op thread each: what a node computes does not depend on which
chunk or thread it is in (beyond float rounding).

Precision: parameters, momentum and updates are float32; a training step's forward and
backward run in `train_dtype` (float32 unless asked: bfloat16 is mixed precision) and
evaluation in `eval_dtype` (the batched engine picks bfloat16 where the CPU has it natively).
"""

from __future__ import annotations

import copy
import ctypes
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from p2pfl.learning.merge import Weights
from p2pfl.simulation.stacked_layers import StackedForward, stacked_forward

__all__ = ["StackedModels", "bfloat16_is_fast", "keep_freed_memory", "unbatchable"]

# Bytes of one vmap call's per-node state (parameters, momentum, gradient, one minibatch's
# activations): nodes are trained in chunks of about this size, which keep a chunk's tensors in
# the CPU's caches across its steps. Measured on 2 cores, one step of 1,024 nodes: cnn1d 2.0 s
# in one chunk, 0.9 s in chunks of 64; an epoch of sim/batched.toml's 1,024 shards (two
# threads, below) 3.6 s at 64 MB (75 cnn1d nodes a chunk), 2.6-3.0 s at 16-32 MB.
_TRAIN_BYTES = 32 << 20
_TRAIN_CHUNK = 2048  # at most this many nodes in one call (bounds memory for 10,000 nodes)
# Threads that train (and evaluate) chunks side by side, each with one intra-op thread; None:
# torch's intra-op thread count. Chunks of small models are too small for torch to spread one
# operation over the cores well: on 2 cores, two chunks at a time on one core each train
# cnn1d 1.8x and mlp 1.9x faster than one chunk at a time on both, and evaluate 1.3x faster.
_WORKERS: int | None = None
# Nodes x test samples evaluated in one vmap call: 16,384 rows of `mlp`'s 100 hidden units are
# 6.5 MB. Larger calls' activations are allocated fresh from the OS each time (page faults):
# 10,000 mlp nodes on 1,000 samples took 10.1 s at 262,144 rows, 4.8 s at 16,384 (2 cores).
_EVAL_ROWS = 1 << 14
# Models with convolutions, written out (`stacked_layers`): nodes x test samples in one call.
# One core, cnn1d on 1,000 samples: 4 x 250 4.6 ms a node, one node's own kernels on all
# 1,000 at once 6.4, 16 x 1,000 18 (activations out of the caches).
_EVAL_NODES = 4
_EVAL_SAMPLES = 250

_T = TypeVar("_T")
_R = TypeVar("_R")


def unbatchable(model: nn.Module, in_shape: tuple[int, ...], n_classes: int) -> str | None:
    """Why `model` cannot be trained stacked (None: it can): buffers (BatchNorm's running
    statistics are per forward call, not per node), or a forward that `vmap` cannot take."""
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:
        return f"it has buffers ({', '.join(buffers[:3])}), e.g. BatchNorm"
    try:
        probe = StackedModels(model, 2, written_out=False)  # vmap's own path
        x = torch.zeros(2, 2, *in_shape)
        y = torch.zeros(2, 2, dtype=torch.long).clamp(max=n_classes - 1)
        probe._grads(probe.flat, x, y, torch.ones(2, 2))
    except Exception as exc:  # any failure of vmap/functional_call on this model
        return f"torch.func.vmap cannot run it ({type(exc).__name__}: {exc})".splitlines()[0]
    return None


def bfloat16_is_fast() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), where oneDNN's
    bfloat16 convolutions and matrix products run 2-2.5x its float32 ones (cnn1d's
    convolutions on one Zen 4 core) and a whole cnn1d evaluation 1.5x. Elsewhere bfloat16 is
    emulated and slower than float32. (Torch's own private probes: a release without them
    gives False, float32, rather than an error.)"""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def _activations(model: nn.Module, samples: torch.Tensor) -> int:
    """Values one sample leaves behind in `model`'s layers (the outputs of its leaf modules),
    from a forward pass over `samples` (two, as `unbatchable`'s probe: one could trip a layer
    that needs a batch)."""
    total = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(samples)
    finally:
        for hook in hooks:
            hook.remove()
    return max(1, total // max(1, len(samples)))


class StackedModels:
    """N copies of `model` as one `[N, P]` parameter tensor, with per-node SGD state.

    All copies start from `model`'s parameters. `fit` trains chosen nodes on their shards (set
    with `set_data`); `evaluate` tests chosen nodes on one shared test set.
    """

    def __init__(
        self,
        model: nn.Module,
        n: int,
        *,
        eval_dtype: torch.dtype | None = None,
        train_dtype: torch.dtype | None = None,
        written_out: bool = True,
    ) -> None:
        self.model = model
        # What `evaluate` computes in (see `bfloat16_is_fast`); training: `train_dtype`.
        self.eval_dtype = eval_dtype or torch.float32
        # What a training step's forward and backward compute in: with bfloat16, parameters
        # and samples are rounded to it for the step and the gradient comes back as float32
        # (parameters, momentum and the SGD update stay float32: mixed precision).
        self.train_dtype = train_dtype or torch.float32
        named = [(name, p.detach()) for name, p in model.named_parameters()]
        self.names = [name for name, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        sizes = [p.numel() for _, p in named]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self.n = n
        init = torch.cat([p.reshape(-1).float() for _, p in named])
        self.flat = init.repeat(n, 1).contiguous()
        self.momentum = torch.zeros_like(self.flat)
        self._local = threading.local()  # each worker thread's own copy of `model`
        self._pool: ThreadPoolExecutor | None = None  # `_map`'s threads
        self._pool_size = 0
        self._grad_fn = vmap(grad(self._loss, has_aux=True))
        self._eval_logits = vmap(self._logits, in_dims=(0, None))
        self._linear = not any(
            isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()
        )  # no convolution: evaluate nodes in vmapped chunks
        # The model's layers written out for many nodes (`stacked_layers`), unless
        # `_check_fast` finds it differs from vmap on the first samples it sees. Only for
        # models with convolutions: for the rest vmap's `bmm`s are faster (one step of 139 mlp
        # nodes, one core: 14 ms in vmap, 20 written out); cnn1d's is 2x vmap's.
        # `written_out=False`: vmap for every model (the bench's comparison, `unbatchable`).
        self._fast: StackedForward | None = None
        if written_out and not self._linear:
            self._fast = stacked_forward(model)
        self._fast_checked = False

    @property
    def size(self) -> int:
        """Parameters per model."""
        return self.offsets[-1]

    # ---- layout --------------------------------------------------------------------------------

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named `[rows, *shape]` views into a `[rows, P]` tensor."""
        rows = flat.shape[0]
        return {
            name: flat[:, self.offsets[k] : self.offsets[k + 1]].view(rows, *self.shapes[k])
            for k, name in enumerate(self.names)
        }

    def weights(self, flat: np.ndarray) -> Weights:
        """One model as named arrays: views into a `[P]` row (e.g. `tensor[i].numpy()`)."""
        return {
            name: flat[self.offsets[k] : self.offsets[k + 1]].reshape(self.shapes[k])
            for k, name in enumerate(self.names)
        }

    def row(self, weights: Weights) -> torch.Tensor:
        """A model given as named arrays, as one `[P]` row (ValueError on another layout)."""
        if list(weights) != self.names and sorted(weights) != sorted(self.names):
            raise ValueError(f"weights do not match the model: {sorted(weights)}")
        parts = []
        for name, shape in zip(self.names, self.shapes, strict=True):
            array = np.asarray(weights[name], dtype=np.float32)
            if array.shape != shape:
                raise ValueError(f"tensor {name!r} has shape {array.shape}, expected {shape}")
            parts.append(torch.from_numpy(np.ascontiguousarray(array)).reshape(-1))
        return torch.cat(parts)

    # ---- data ----------------------------------------------------------------------------------

    def set_data(
        self, x: np.ndarray, y: np.ndarray, shards: Sequence[np.ndarray], seeds: Sequence[int]
    ) -> None:
        """Training samples `x` and labels `y`; `shards[i]` the sample indices of node i,
        shuffled each epoch by a generator seeded with `seeds[i]` (see `reseed`).

        Shards are disjoint, so `y` may hold each node's own labels (a label-flipping node's
        flipped ones)."""
        self.seeds = list(seeds)
        self.generators = [torch.Generator().manual_seed(seed) for seed in self.seeds]
        self.x = torch.tensor(np.asarray(x))
        self.labels = torch.tensor(np.asarray(y), dtype=torch.long)
        self.sizes = torch.tensor([len(s) for s in shards], dtype=torch.long)
        width = max(1, int(self.sizes.max()))
        self.index = torch.zeros(self.n, width, dtype=torch.long)
        for i, shard in enumerate(shards):
            self.index[i, : len(shard)] = torch.from_numpy(np.asarray(shard, dtype=np.int64))
        self._activations = _activations(self.model, self.x[:2])

    def chunk_rows(self, batch_size: int) -> int:
        """Nodes trained in one `vmap` call: `_TRAIN_BYTES` of per-node state, 16 to
        `_TRAIN_CHUNK` nodes."""
        per_node = 4 * (3 * self.size + batch_size * self._activations)
        return max(16, min(_TRAIN_CHUNK, _TRAIN_BYTES // per_node))

    def reseed(self, i: int) -> None:
        """Node `i`'s batch order starts over, as a restarted learner's loader does."""
        self.generators[i] = torch.Generator().manual_seed(self.seeds[i])

    def _orders(self, chunk: torch.Tensor, width: int) -> torch.Tensor:
        """One epoch's sample order of each node of `chunk`: `torch.randperm` of its shard
        from its own generator (what a shuffled `DataLoader` draws), padding after it."""
        order = torch.arange(width).repeat(len(chunk), 1)
        for k, i in enumerate(chunk.tolist()):
            size = int(self.sizes[i])
            g = self.generators[i]
            # A DataLoader's iterator first draws its base seed from the loader's generator,
            # which its RandomSampler shares; the sampler then draws one permutation it uses
            # and one more it keeps none of (`[: num_samples % n]`). All drawn, in that order.
            torch.empty((), dtype=torch.int64).random_(generator=g)
            order[k, :size] = torch.randperm(size, generator=g)
            torch.randperm(size, generator=g)
        return order

    # ---- training ------------------------------------------------------------------------------

    def _logits(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        # functional_call swaps the module's parameters while it runs: a thread needs its own.
        return functional_call(getattr(self._local, "model", self.model), params, (x,))

    def _map(self, fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
        """`[fn(item) for item in items]`, on `_WORKERS` threads when there is more than one
        item (each thread with its own copy of the model and one intra-op thread).

        The threads live as long as this object: new threads for every call (two a round)
        took new memory from the OS for their allocations, ~300,000 page faults a round of
        sim/batched.toml (`keep_freed_memory` is the other half of that)."""
        size = _WORKERS or torch.get_num_threads()
        if min(size, len(items)) <= 1:
            return [fn(item) for item in items]
        if self._pool is None or self._pool_size != size:
            if self._pool is not None:
                self._pool.shutdown()
            self._pool, self._pool_size = ThreadPoolExecutor(size), size

        def task(item: _T) -> _R:
            if not hasattr(self._local, "model"):
                self._local.model = copy.deepcopy(self.model)
            return fn(item)

        with _one_intra_op_thread():
            return list(self._pool.map(task, items))

    def _loss(
        self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ce = F.cross_entropy(self._logits(params, x).float(), y, reduction="none")
        loss = (ce * w).sum() / w.sum().clamp(min=1.0)
        return loss, loss.detach()

    def _grads(
        self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every row's gradient (`[rows, P]`) and loss on its own minibatch, for the rows of
        parameters `flat`, computed in `train_dtype` (the gradient returned as float32)."""
        flat, x = flat.to(self.train_dtype), x.to(self.train_dtype)
        if self._fast is None:
            grads, loss = self._grad_fn(self.views(flat), x, y, w)
            return self._gathered([grads[name] for name in self.names]), loss
        # Rows' parameters are disjoint: the gradient of the summed losses is each row's own.
        # Each tensor its own leaf (not views of one `[rows, P]` leaf, whose gradient autograd
        # would build as one zero-filled `[rows, P]` sum per tensor), convolution weights
        # `[rows, out, in, kernel]` with `in` innermost in memory: the channels-last layout
        # oneDNN computes in, so neither the weight nor its gradient is reordered (-2%).
        leaves = {name: _leaf(view) for name, view in self.views(flat).items()}
        logits = self._fast(leaves, x).float()
        ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(w)
        loss = (ce * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)
        grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
        return self._gathered(grads), loss.detach()

    def _gathered(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-tensor gradients (`[rows, *shape]`, in `self.names`' order, any layout and
        dtype) as one float32 `[rows, P]`: layout and dtype in one copy per tensor."""
        out = torch.empty(grads[0].shape[0], self.size)
        for g, view in zip(grads, self.views(out).values(), strict=True):
            view.copy_(g)
        return out

    def _check_fast(self, x: torch.Tensor) -> None:
        """Keep the written-out forward only if it gives vmap's logits on two of `x`'s samples
        (a layer used in a way it does not cover raises or differs: vmap then does it all)."""
        if self._fast is None or self._fast_checked:
            return
        self._fast_checked = True
        noise = torch.randn(2, self.size, generator=torch.Generator().manual_seed(0))
        flat = self.flat[:2] + 0.01 * noise  # two distinct models
        probe = x[:2].unsqueeze(0).expand(2, *x[:2].shape)
        try:
            with torch.no_grad():
                fast = self._fast(self.views(flat), probe)
                want = vmap(self._logits)(self.views(flat), probe)
            torch.testing.assert_close(fast, want, rtol=1e-4, atol=1e-5)
        except Exception:  # any failure means: not this model
            self._fast = None

    def fit(
        self,
        nodes: torch.Tensor,
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        momentum: float,
        weight_decay: float = 0.0,
        mu: float = 0.0,
        max_grad_norm: float = 0.0,
    ) -> torch.Tensor:
        """Train `nodes` (indices) for `epochs` epochs of SGD each on its own shard; returns
        the mean training loss of each node's last epoch (`[N]`, NaN for the others)."""
        losses = torch.full((self.n,), float("nan"), dtype=torch.float64)
        self._check_fast(self.x)
        # Nodes of like shard sizes share a chunk: its steps are as many, and its last step as
        # short, as most of its nodes' (padding ~15% of batched.toml's samples otherwise).
        # The longest chunks first: the threads then end on short ones, together (ending on
        # the largest shards left one core idle for ~3% of batched.toml's training).
        by_size = nodes[torch.argsort(self.sizes[nodes], stable=True)]
        chunks = by_size.split(self.chunk_rows(batch_size))[::-1]
        done = self._map(
            lambda chunk: self._fit_chunk(
                chunk, epochs, batch_size, lr, momentum, weight_decay, mu, max_grad_norm
            ),
            chunks,
        )
        for chunk, chunk_losses in zip(chunks, done, strict=True):
            losses[chunk] = chunk_losses
        return losses

    def _fit_chunk(
        self,
        chunk: torch.Tensor,
        epochs: int,
        batch_size: int,
        lr: float,
        momentum: float,
        weight_decay: float,
        mu: float,
        max_grad_norm: float,
    ) -> torch.Tensor:
        p, buf = self.flat[chunk], self.momentum[chunk]
        anchor = p.clone() if mu > 0 else None
        sizes, index = self.sizes[chunk], self.index[chunk]
        width = index.shape[1]
        steps = math.ceil(int(sizes.max()) / batch_size) if len(chunk) else 0
        loss_sum = torch.zeros(len(chunk), dtype=torch.float64)
        for _ in range(epochs):
            order = self._orders(chunk, width)
            loss_sum.zero_()
            for step in range(steps):
                # Only the nodes with samples left this epoch compute (and step) at all.
                rows = (sizes > step * batch_size).nonzero().flatten()
                every = len(rows) == len(chunk)
                p_rows, buf_rows = (p, buf) if every else (p[rows], buf[rows])
                start = step * batch_size
                left = int((sizes[rows] - start).max())  # the longest of their next batches
                pos = order[rows, start : start + min(batch_size, left)]
                w = (pos < sizes[rows, None]).float()
                samples = index[rows].gather(1, pos)
                g, loss = self._grads(p_rows, self.x[samples], self.labels[samples], w)
                if anchor is not None:
                    g = g + mu * (p_rows - anchor[rows])
                if max_grad_norm:  # as torch.nn.utils.clip_grad_norm_, row by row
                    coef = max_grad_norm / (g.norm(dim=1, keepdim=True) + 1e-6)
                    g = g * coef.clamp(max=1.0)
                if weight_decay:  # after the clip, as SGD's own weight decay
                    g = g + weight_decay * p_rows
                buf_rows = momentum * buf_rows + g if momentum else g
                p_rows = p_rows - lr * buf_rows
                if every:
                    p, buf = p_rows, buf_rows
                else:
                    p[rows], buf[rows] = p_rows, buf_rows
                loss_sum[rows] += loss.double() * w.sum(dim=1).double()
        self.flat[chunk] = p
        self.momentum[chunk] = buf
        return loss_sum / sizes.clamp(min=1).double()

    # ---- evaluation ----------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(
        self, nodes: torch.Tensor, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Accuracy and mean cross-entropy of each of `nodes` on (`x`, `y`).

        Models without convolutions: `vmap` over chunks of nodes sharing `x` is batched matrix
        products (2.5x faster than one node at a time for `mlp`: 1,000 nodes, 1,000 samples).
        With convolutions: the written-out forward on `_EVAL_NODES` nodes x `_EVAL_SAMPLES`
        samples a call where it applies, else one node at a time on the whole test set (its
        own kernels beat their `vmap`ped form there). Runs of nodes go to the worker threads.
        """
        self._check_fast(x)
        x = x.to(self.eval_dtype)
        order = nodes.tolist()
        if self._linear:
            size = step = max(1, _EVAL_ROWS // max(1, len(x)))
        else:  # what a worker thread takes at a time: 16 nodes
            size, step = (_EVAL_NODES if self._fast is not None else 1), 16
        runs = [order[k : k + step] for k in range(0, len(order), step)]

        @torch.no_grad()  # per thread: the decorator above holds in this thread only
        def run(nodes_: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            accuracy = torch.empty(len(nodes_), dtype=torch.float64)
            loss = torch.empty(len(nodes_), dtype=torch.float64)
            for k in range(0, len(nodes_), size):
                rows = nodes_[k : k + size]
                logits = self._test_logits(rows, x).float()
                ce = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(rows)), reduction="none")
                loss[k : k + len(rows)] = ce.view(len(rows), -1).mean(dim=1).double()
                hits = logits.argmax(dim=-1) == y
                accuracy[k : k + len(rows)] = hits.double().mean(dim=1)
            return accuracy, loss

        done = self._map(run, runs)
        if not done:
            return torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.float64)
        return torch.cat([a for a, _ in done]), torch.cat([loss for _, loss in done])

    def _test_logits(self, rows: list[int], x: torch.Tensor) -> torch.Tensor:
        """`[len(rows), len(x), classes]`: the logits of nodes `rows` on the shared `x`, in
        `x`'s dtype."""
        params = self.views(self.flat[rows].to(x.dtype))
        if self._linear:
            return self._eval_logits(params, x)
        if self._fast is None:
            return self._logits({name: p[0] for name, p in params.items()}, x).unsqueeze(0)
        parts = [
            self._fast(params, part.unsqueeze(0).expand(len(rows), *part.shape))
            for part in x.split(_EVAL_SAMPLES)
        ]
        return torch.cat(parts, dim=1)

    def weights_of(self, i: int) -> dict[str, torch.Tensor]:
        """Node `i`'s parameters as named tensors (views)."""
        return {name: view[0] for name, view in self.views(self.flat[i : i + 1]).items()}


def _leaf(view: torch.Tensor) -> torch.Tensor:
    """`view` (`[rows, *shape]`) as a leaf to differentiate against, laid out as the written-out
    forward uses it: a 1-d convolution's weight `[rows, out, in, kernel]` with `in` innermost
    (channels last), anything else contiguous."""
    if view.dim() == 4:
        laid = view.transpose(2, 3).contiguous().transpose(2, 3)
    else:
        laid = view.contiguous()
    return laid.detach().requires_grad_()


def keep_freed_memory() -> None:
    """Have glibc's malloc keep freed memory for reuse instead of giving it back to the OS
    (a larger trim threshold; blocks up to 256 MB from its heaps, not `mmap`): a training
    step's activations are freed and allocated again step after step, and each time they came
    back from the OS as new pages (~300,000 page faults, ~1 s of system time a round of
    sim/batched.toml). Process-wide, for the batched engine's process; peak memory is what
    it was. Nothing where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (or not a POSIX dlopen)
        return
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    mallopt(_M_MMAP_THRESHOLD, 256 << 20)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


@contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """Torch's operations run on one thread each while inside (then as many as before)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
