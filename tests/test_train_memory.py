"""Training within a memory budget: the memory estimate (vtx/train/memory.py), ``--batch-size
auto``, activation checkpointing, gradient accumulation, paper-size presets in training, and
attention summaries that never build an L x L matrix."""

from __future__ import annotations

import torch
import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from test_train import config, make_cache, quiet
from vtx.errors import UsageError
from vtx.heads import build_head
from vtx.train.checkpoint import read_checkpoint
from vtx.train.memory import auto_batch_size, estimate_training_memory, fake_batch
from vtx.train.trainer import loss_fn, train_head

SPACE = dict(n_outputs=3, d_model=32, n_heads=2, depth=2, feature_dim=24, n_patches=4, n_frames=4)
HEADS = [
    pytest.param("stan", dict(n_outputs=3, d_model=32, n_heads=2, n_layers=2, resnet18_dim=24,
                              r2plus1d_dim=20, dropout=0.2), 12, id="stan"),
    pytest.param("vtn", dict(n_outputs=3, d_model=32, n_heads=2, n_layers=2, feature_dim=24,
                             window=4, max_len=64, dropout=0.2), 12, id="vtn"),
    pytest.param("timesformer", dict(SPACE, dropout=0.2), 4, id="timesformer"),
    pytest.param("mevit", dict(SPACE, n_patches=16, dropout=0.2), 4, id="mevit"),
    pytest.param("mmvit", dict(n_outputs=3, d_model=32, n_heads=2, depth=2, n_frames=4, n_patches=4,
                               motion_grid=2, residual_size=4, vit_dim=24, vggish_dim=12,
                               dropout=0.2), 4, id="mmvit"),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def saved_bytes(fn) -> int:
    """Bytes of the distinct real storages saved for backward while ``fn()`` runs (parameters
    excluded), the independent count the estimate must reproduce."""
    seen: dict[int, int] = {}
    alive = []  # a storage freed early (a branch that never reaches the loss) is not reused

    def pack(t):
        st = t.untyped_storage()
        alive.append(t)
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return seen, out


# --- the estimate ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,cfg,L", HEADS)
def test_estimate_counts_what_a_real_forward_saves(name, cfg, L):
    # without attention dropout: PyTorch's CPU attention then saves an L x L softmax that CUDA's
    # fused kernels (and so the estimate) do not keep
    torch.manual_seed(0)
    head = build_head(name, **dict(cfg, dropout=0.0)).train()
    params = {p.untyped_storage().data_ptr() for p in head.parameters()}
    batch = fake_batch(head.inputs, 3, L)
    seen, _ = saved_bytes(lambda: loss_fn("multilabel", head(batch), torch.zeros(3, 3)))
    real = sum(b for k, b in seen.items() if k not in params)
    est = estimate_training_memory(name, head.config, head.inputs, 3, L)
    assert est.activations == real
    n_params = sum(p.numel() for p in head.parameters()) * 4
    assert (est.params, est.grads, est.optimizer) == (n_params, n_params, 2 * n_params)
    assert est.peak == 4 * n_params + real + est.workspace
    # activation checkpointing and AMP save less
    ckpt = estimate_training_memory(name, head.config, head.inputs, 3, L, grad_checkpoint=True)
    amp = estimate_training_memory(name, head.config, head.inputs, 3, L, amp=True)
    assert ckpt.activations < est.activations and amp.activations < est.activations


@pytest.mark.parametrize("name,cfg,L", HEADS)
def test_grad_checkpointing_gives_the_same_gradients_and_saves_less(name, cfg, L):
    torch.manual_seed(0)
    head = build_head(name, **cfg).train()
    batch = fake_batch(head.inputs, 2, L)

    def grads(checkpointing: bool):
        head.set_grad_checkpointing(checkpointing)
        head.zero_grad()
        torch.manual_seed(1)  # the same dropout masks (checkpoint restores the RNG state)
        seen, out = saved_bytes(lambda: head(batch))
        out.square().sum().backward()
        return {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}, \
            sum(seen.values())

    plain, plain_bytes = grads(False)
    ckpt, ckpt_bytes = grads(True)
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-6, rtol=1e-5, msg=n)
    assert ckpt_bytes < plain_bytes


def test_auto_batch_size_is_the_largest_that_fits():
    name, cfg = "timesformer", dict(SPACE)
    head = build_head(name, **cfg)
    est = {b: estimate_training_memory(name, head.config, head.inputs, b, 4).peak for b in (1, 2, 9, 10)}
    budget = (est[9] + est[10]) // 2
    size, estimate, got_budget = auto_batch_size(name, head, 4, 100, torch.device("cpu"),
                                                 amp=False, grad_checkpoint=False, budget=budget)
    assert (size, got_budget) == (9, budget) and estimate.peak == est[9] <= budget < est[10]
    # never more than the training set, and halved until a real step fits (CUDA)
    assert auto_batch_size(name, head, 4, 5, torch.device("cpu"), amp=False,
                           grad_checkpoint=False, budget=budget)[0] == 5
    tried = []
    size, _, _ = auto_batch_size(name, head, 4, 100, torch.device("cpu"), amp=False,
                                 grad_checkpoint=False, budget=budget,
                                 try_step=lambda b: tried.append(b) or b <= 3)
    assert tried == [9, 4, 2] and size == 2
    with pytest.raises(UsageError, match=r"one training video of 4 tokens needs about .*--grad-checkpoint"):
        auto_batch_size(name, head, 4, 100, torch.device("cpu"), amp=False,
                        grad_checkpoint=False, budget=est[1] - 1)


# --- training --------------------------------------------------------------------------------------


def test_batch_size_auto_trains_and_records_the_size(tmp_path):
    cache, labels, _ = make_cache(tmp_path, n_videos=10)
    logs = []
    train_head(config(cache, labels, tmp_path / "run", epochs=1, batch_size="auto"), log=logs.append)
    saved = read_checkpoint(tmp_path / "run" / "last.pt")["train_config"]
    line = next(m for m in logs if "--batch-size auto" in m)
    assert isinstance(saved["batch_size"], int) and f"auto: {saved['batch_size']} videos" in line
    assert 1 <= saved["batch_size"] <= 10


@pytest.mark.parametrize("n_videos", [pytest.param(16, id="full-steps"),
                                      pytest.param(14, id="last-step-short")])
def test_accumulation_gives_the_gradients_of_one_big_batch(tmp_path, monkeypatch, n_videos):
    """Batches of 4 accumulated twice give, at every optimizer step, the gradients of one batch
    of 8 (to float error), the epoch's short last step included; plain batches of 4 do not."""
    cache, labels, _ = make_cache(tmp_path, n_videos=n_videos, splits=("train",))
    opts = {"d_model": 16, "n_heads": 2, "n_layers": 1, "dropout": 0.0}
    steps: list[list[torch.Tensor]] = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *a, **k):
        steps.append([p.grad.clone() for g in self.param_groups for p in g["params"]
                      if p.grad is not None])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)

    def run(out, **kw):
        steps.clear()
        train_head(config(cache, labels, tmp_path / out, head="stan", epochs=2, lr=1e-2,
                          grad_clip=0.0, head_options=opts, **kw), log=quiet)
        return list(steps)

    big = run("big", batch_size=8)
    acc = run("acc", batch_size=4, accumulate=2)
    small = run("small", batch_size=4)
    assert len(big) == len(acc) == 2 * -(-n_videos // 8) and len(small) == 2 * len(big)
    scale = max(g.abs().max() for g in big[0])
    for s_big, s_acc in zip(big, acc):
        for g_big, g_acc in zip(s_big, s_acc):
            torch.testing.assert_close(g_acc, g_big, atol=1e-6 * scale, rtol=1e-4)
    assert any(not torch.allclose(a, b, atol=1e-3 * scale) for a, b in zip(small[0], big[0]))


def test_paper_size_and_grad_checkpoint_in_training(tmp_path):
    cache, labels, _ = make_cache(tmp_path, n_videos=6)
    logs = []
    train_head(config(cache, labels, tmp_path / "run", head="stan", epochs=1, size="paper",
                      grad_checkpoint=True, head_options={"n_layers": 1}), log=logs.append)
    ckpt = read_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["head_config"]["d_model"] == 768 and ckpt["head_config"]["n_layers"] == 1
    assert ckpt["train_config"]["size"] == "paper" and ckpt["train_config"]["grad_checkpoint"]
    with pytest.raises(UsageError, match="has no 'paper' size"):
        train_head(config(cache, labels, tmp_path / "mp", size="paper"), log=quiet)
    with pytest.raises(UsageError, match="--accumulate must be at least 1"):
        train_head(config(cache, labels, tmp_path / "a0", accumulate=0), log=quiet)
    with pytest.raises(UsageError, match="--batch-size at least 1 or 'auto'"):
        train_head(config(cache, labels, tmp_path / "bs", batch_size="big"), log=quiet)


# --- attention summaries ---------------------------------------------------------------------------


class LargestSquare(TorchDispatchMode):
    """Records the largest ``n x n`` trailing block any op produces (an L x L attention matrix)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == t.shape[-2]:
                self.largest = max(self.largest, t.shape[-1])
        return out


@pytest.mark.parametrize("name,cfg,L", [
    pytest.param("stan", dict(n_outputs=2, d_model=16, n_heads=2, n_layers=2), 300, id="stan"),
    pytest.param("vtn", dict(n_outputs=2, d_model=16, n_heads=2, n_layers=2, window=8), 300, id="vtn"),
    pytest.param("timesformer", dict(SPACE, attention="joint", n_patches=64, n_frames=5), 5,
                 id="timesformer-joint"),
    pytest.param("mmvit", dict(n_outputs=2, d_model=16, n_heads=2, depth=1, n_frames=4, n_patches=16,
                               motion_grid=4, residual_size=8, variant=1), 4, id="mmvit-joint"),
])
def test_explain_never_builds_an_l_by_l_matrix(name, cfg, L):
    head = build_head(name, **cfg).eval()
    batch = fake_batch(head.inputs, 1, L)
    tokens = {"stan": L + 1, "vtn": L + 1, "timesformer": 5 * 64 + 1, "mmvit": 4 * 4 * 16 + 1}[name]
    with torch.no_grad(), LargestSquare() as seen:
        logits, attn = head(batch, return_attention=True)
    assert attn.shape == (1, L) and torch.allclose(attn.sum(1), torch.ones(1))
    assert seen.largest < tokens // 2, seen.largest  # no (tokens x tokens) scores or probabilities


def test_estimate_runs_every_head():
    """The LSTM baseline packs sequences by their lengths (a shape fake tensors cannot know):
    its estimate runs for real on the CPU instead."""
    for name in ("lstm", "meanpool"):
        head = build_head(name, n_outputs=3)
        one = estimate_training_memory(name, head.config, head.inputs, 1, 20)
        two = estimate_training_memory(name, head.config, head.inputs, 2, 20)
        assert 0 < one.activations < two.activations
