"""Training memory of a head: an estimate without real memory, and ``--batch-size auto``.

One training step holds, at its peak (the backward pass of a step after the first):

* the parameters, their gradients and AdamW's two moments: ``4 x`` the parameter bytes;
* the activations the forward pass saved for the backward pass;
* with AMP, autocast's fp16 copies of the weights (half the parameter bytes);
* a workspace for the backward pass: twice the largest saved tensor (an activation's gradient
  and its input's, alive together).

:func:`estimate_training_memory` counts these for a head config and batch shape **without any
real memory**: the head is built on the ``meta`` device, moved with ``to_empty`` into a
``FakeTensorMode`` (tensors with shapes, dtypes and storages but no data), and a forward pass
runs under ``torch.autograd.graph.saved_tensors_hooks``, whose pack hook sums the bytes of every
distinct storage saved for backward (parameters excluded: they are counted once above; what a
branch that never reaches the loss saves is counted too, though a real step frees it early, so
the estimate errs high). With
AMP the forward runs under CPU autocast in fp16, which casts the same op families as CUDA's
(matrix products in fp16, softmax and norms in fp32). With activation checkpointing each layer
of a stack keeps only its inputs, and the backward pass recomputes one layer at a time: the
estimate replaces each layer's saved bytes by its input bytes and adds the largest layer's.
Attention dropout is counted as CUDA's fused kernels hold it (they regenerate the mask in the
backward pass from a seed): PyTorch's CPU kernel falls back to an explicit ``L x L`` softmax when
``dropout_p > 0``, which the GPU never stores, so the estimate runs ``scaled_dot_product_attention``
without dropout.

On a CUDA device :func:`measure_training_memory` runs one real step and reads
``torch.cuda.max_memory_allocated``; ``bench/head_memory.py`` reports both.

:func:`auto_batch_size` (``vtx train-head --batch-size auto``) fits the estimate, linear in the
batch, to the device's free memory (CUDA) or to half the available RAM (CPU), for the longest
video of the training split, and on CUDA confirms the pick with a real step, halving it on an
out-of-memory error.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vtx.errors import UsageError
from vtx.heads import HEADS
from vtx.heads.base import input_shape

__all__ = ["MemoryEstimate", "auto_batch_size", "device_budget", "estimate_training_memory",
           "measure_training_memory", "fake_batch"]

GiB = 2**30


@dataclass
class MemoryEstimate:
    """Bytes of one training step (see the module docstring). ``peak`` is their sum."""

    params: int
    grads: int
    optimizer: int
    activations: int
    workspace: int
    amp_weights: int = 0

    @property
    def peak(self) -> int:
        return (self.params + self.grads + self.optimizer + self.activations + self.workspace
                + self.amp_weights)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak": self.peak}


def fake_batch(inputs: Mapping[str, int | tuple], batch: int, length: int,
               device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """A batch of ``batch`` videos of ``length`` tokens for a head with ``inputs`` (call inside a
    ``FakeTensorMode`` for shapes only, or outside for real random values)."""
    out: dict[str, Tensor] = {name: torch.randn(batch, length, *input_shape(w), device=device)
                              for name, w in inputs.items()}
    out["mask"] = torch.ones(batch, length, dtype=torch.bool, device=device)
    out["positions"] = torch.arange(length, device=device).expand(batch, length)
    return out


def _loss(task: str, logits: Tensor) -> Tensor:
    from vtx.train.trainer import loss_fn

    B, C = logits.shape
    if task == "multiclass":
        return loss_fn(task, logits, torch.zeros(B, dtype=torch.long, device=logits.device))
    if task == "regression":
        return loss_fn(task, logits, torch.zeros(B, device=logits.device))
    return loss_fn(task, logits, torch.zeros(B, C, device=logits.device))


class _FusedAttention(torch.overrides.TorchFunctionMode):
    """``F.scaled_dot_product_attention`` without dropout: what CUDA's fused kernels keep for the
    backward pass, also when training with attention dropout (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.nn.functional.scaled_dot_product_attention:
            if len(args) > 4:  # (query, key, value, attn_mask, dropout_p, ...)
                args = (*args[:4], 0.0, *args[5:])
            if "dropout_p" in kwargs:
                kwargs["dropout_p"] = 0.0
        return func(*args, **kwargs)


def _stacks(head: nn.Module) -> list[nn.Module]:
    """The layers that activation checkpointing wraps: the children of every stack."""
    layers = []
    for m in head.modules():
        if hasattr(m, "grad_checkpointing"):
            layers += list(m.layers if hasattr(m, "layers") else m)
    return layers


def estimate_training_memory(name: str, config, inputs: Mapping[str, int | tuple], batch: int,
                             length: int, *, amp: bool = False, grad_checkpoint: bool = False
                             ) -> MemoryEstimate:
    """Peak bytes of one training step of head ``name``, with no real memory (fake tensors).

    Args:
        name: a key of :data:`vtx.heads.HEADS`.
        config: the head's config (a dataclass or a dict of its fields).
        inputs: the head's ``inputs`` (feature -> width or token shape).
        batch: videos per step.
        length: tokens per video.
        amp: fp16 autocast (as ``--amp`` on CUDA).
        grad_checkpoint: activation checkpointing (``--grad-checkpoint``).
    """
    from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode

    cfg = config if dataclasses.is_dataclass(config) else HEADS[name].Config(**config)
    with torch.device("meta"):
        meta = HEADS[name](cfg)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            return _estimate(meta.to_empty(device="cpu"), inputs, batch, length, amp,
                             grad_checkpoint)
    except DynamicOutputShapeException:
        # an op whose output shape depends on the values (the LSTM baseline packs sequences by
        # their lengths): run it for real on the CPU (the baselines are small)
        head = HEADS[name](cfg)
        return _estimate(head, inputs, batch, length, amp, grad_checkpoint)


def _estimate(head: nn.Module, inputs: Mapping[str, int | tuple], batch: int, length: int,
              amp: bool, grad_checkpoint: bool) -> MemoryEstimate:
    """:func:`estimate_training_memory` on a head whose tensors are fake (or real)."""
    head = head.train()
    param_bytes = sum(p.numel() * p.element_size() for p in head.parameters())
    param_storages = {p.untyped_storage()._cdata for p in head.parameters()}
    x = fake_batch(inputs, batch, length)
    saved: dict[int, int] = {}  # storage -> bytes
    alive = []  # the saved storages, so that no address is reused while counting
    per_layer: dict[int, dict[int, int]] = {}  # layer -> its saved storages
    layer_inputs: dict[int, int] = {}
    current: list[int] = []

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        key = st._cdata
        if key not in param_storages:
            alive.append(st)
            saved[key] = st.nbytes()
            if current:
                per_layer.setdefault(current[-1], {})[key] = st.nbytes()
        return t

    def pre(i):
        def hook(module, args):
            current.append(i)
            layer_inputs[i] = sum(a.numel() * a.element_size() for a in args
                                  if isinstance(a, Tensor) and a.is_floating_point())
        return hook

    def post(module, args, out):
        current.pop()

    handles = []
    for i, layer in enumerate(_stacks(head)):
        handles += [layer.register_forward_pre_hook(pre(i)), layer.register_forward_hook(post)]
    with ExitStack() as stack:
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        stack.enter_context(_FusedAttention())
        if amp:
            stack.enter_context(torch.autocast("cpu", dtype=torch.float16))
        _loss("multilabel", head(x).float())
    for h in handles:
        h.remove()
    activations = sum(saved.values())
    largest = max(saved.values(), default=0)
    if grad_checkpoint and per_layer:
        inside = {k for layer in per_layer.values() for k in layer}
        kept = sum(b for k, b in saved.items() if k not in inside)
        recompute = max(sum(layer.values()) for layer in per_layer.values())
        activations = kept + sum(layer_inputs.values()) + recompute
        largest = max(max(layer.values(), default=0) for layer in per_layer.values())
    return MemoryEstimate(params=param_bytes, grads=param_bytes, optimizer=2 * param_bytes,
                          activations=activations, workspace=2 * largest,
                          amp_weights=param_bytes // 2 if amp else 0)


def measure_training_memory(head: nn.Module, batch: Mapping[str, Tensor], *, amp: bool = True,
                            task: str = "multilabel", steps: int = 2) -> int:
    """Peak CUDA bytes of ``steps`` real AdamW training steps (``max_memory_allocated``; the
    second step holds the optimizer state as every later one does)."""
    device = next(head.parameters()).device
    if device.type != "cuda":
        raise UsageError("measuring training memory needs a CUDA device")
    head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-6)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            logits = head(dict(batch))
        scaler.scale(_loss(task, logits.float())).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del optimizer
    torch.cuda.empty_cache()
    return int(peak)


def device_budget(device: torch.device) -> int:
    """Bytes a training step may use: 90 % of the CUDA device's free memory, or half of the
    RAM available (``MemAvailable``) on the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return int(available * 0.5)


def auto_batch_size(name: str, head: nn.Module, length: int, n_videos: int,
                    device: torch.device, *, amp: bool, grad_checkpoint: bool,
                    budget: int | None = None,
                    try_step: Callable[[int], bool] | None = None) -> tuple[int, MemoryEstimate, int]:
    """The largest batch whose estimated training step fits the device (``--batch-size auto``).

    Args:
        name: the head's name.
        head: the head (its config and inputs are read; it is not run).
        length: tokens of the longest training video (every batch may hold it).
        n_videos: training videos: a larger batch is pointless.
        device: where training runs.
        amp: AMP is on (CUDA).
        grad_checkpoint: activation checkpointing is on.
        budget: bytes allowed [default: :func:`device_budget`].
        try_step: runs one real step at a batch size and says whether it fitted (on CUDA);
            the pick is halved until it does.

    Returns:
        ``(batch size, the estimate at that size, the budget)``.

    Raises:
        UsageError: not even one video fits; the message says what to change.
    """
    budget = device_budget(device) if budget is None else int(budget)
    one = estimate_training_memory(name, head.config, head.inputs, 1, length, amp=amp,
                                   grad_checkpoint=grad_checkpoint)
    two = estimate_training_memory(name, head.config, head.inputs, 2, length, amp=amp,
                                   grad_checkpoint=grad_checkpoint)
    per_video = max(two.peak - one.peak, 1)
    fixed = one.peak - per_video
    if one.peak > budget:
        raise UsageError(
            f"one training video of {length} tokens needs about {one.peak / GiB:.1f} GiB for "
            f"head {name!r}, more than the {budget / GiB:.1f} GiB available on {device}; pass "
            f"--grad-checkpoint{'' if amp or device.type != 'cuda' else ' and --amp'}, fewer "
            f"tokens (--max-tokens) or a smaller head (--size default, --d-model)")
    size = max(1, min(n_videos, (budget - fixed) // per_video))
    if try_step is not None:
        while size > 1 and not try_step(size):
            size //= 2
    estimate = estimate_training_memory(name, head.config, head.inputs, size, length, amp=amp,
                                        grad_checkpoint=grad_checkpoint)
    return int(size), estimate, budget
