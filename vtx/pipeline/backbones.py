"""Frozen backbones that turn sampled frames (or audio) into feature tokens.

What each feature is (model, weights, level, clip length, datasets) lives in the registry,
:mod:`vtx.features`; this module builds and runs the models the registry names:

* torchvision classification models, built with ``torchvision.models.get_model`` and loaded from
  their weights enum; the stored token is the penultimate output (the input of the model's last
  ``Linear``, which is replaced by ``nn.Identity``). This covers ``resnet18`` and ``r2plus1d``
  (STAN, ``stan.txt`` section 3), ``vit`` (VTN, ``vtn.txt``) and every ``tv:`` feature.
* ViT's patch tokens (``vit_patches``, TimeSformer / MEViT / MM-ViT) come from the same encoder
  run as its CLS token.
* VGGish embeddings of 0.96 s log-mel examples (``mm-vit.txt``, :mod:`vtx.pipeline.vggish`).

Preprocessing is owned by torchvision: the resize and crop geometry, interpolation, mean and std
are read from ``weights.transforms()`` of the weight enum. The built-in ViT's crop is also the
*grid view*: the image region that every spatial grid of the cache covers (ViT patches, codec
motion and residuals; :func:`grid_prep`); with ``--full-frame-grids`` the ViT instead sees the
whole frame resized to its input size, and so do the grids. For speed, frames are reduced to the
model's input size as soon as they are decoded (:class:`FramePrep`, on uint8); the rest of the
transform (rescale, normalise, layout) runs batched on the model's device.

Weights resolve through the torch hub cache exactly as torchvision does
(``weights.get_state_dict``), so ``$TORCH_HOME/hub/checkpoints/<file>`` is used when present.

Precision (``--precision``, :func:`resolve_precision`): ``fp32`` runs the models as loaded;
``bf16`` on a CPU casts the model's weights and inputs to bfloat16 (oneDNN's native bf16 kernels
on CPUs with AVX512_BF16 or AMX, accumulating in fp32); on CUDA, ``fp16`` and ``bf16`` run the
fp32 model under ``torch.autocast``. ``auto`` picks fp16 on CUDA, bf16 on a CPU with native bf16
and fp32 otherwise. Outputs are float32 whatever the precision (stored as ``--dtype``). On a CPU
the conv nets run in channels-last layout at any precision (:data:`CHANNELS_LAST`). Casting beats
CPU autocast, and channels-last helps, as measured by ``bench/precision.py --variants``
(docs/BENCHMARKS.md, "Precision").
"""

from __future__ import annotations

import urllib.error
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from vtx.errors import UsageError, WeightsUnavailable
from vtx.features import (FEATURES, FULL_FRAME, FeatureSpec, follows_grid_view, parse_feature,
                          weights_member)

THUMBNAIL = "thumbnail"
"""Pseudo-feature: a small picture of the shot's center frame (for ``vtx predict --explain``)."""

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""The values of ``--precision``; every one but ``auto`` is also a dataset's ``precision`` attr."""
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU features that give native bf16 matrix kernels (x86 names, as in ``/proc/cpuinfo``)."""
CHANNELS_LAST = {"resnet18": torch.channels_last, "r2plus1d_18": torch.channels_last_3d,
                 "VGGish": torch.channels_last}
"""CPU memory layout per builder, where measured faster in fp32 and bf16 (docs/BENCHMARKS.md,
"Precision"): the conv nets; ViT-B/16 gains nothing (one conv), and ``tv:`` models are left in
the default layout (not measured)."""


def cpu_native_bf16() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512_BF16 or AMX-BF16).

    Asks PyTorch's own CPU feature detection (``torch._C._cpu._get_cpu_capability()``, a dict of
    ISA flags in torch 2.14; ``torch.backends.cpu.get_cpu_capability()`` only names the vector
    width); falls back to the flags of ``/proc/cpuinfo`` where that is unavailable.
    """
    try:
        caps = torch._C._cpu._get_cpu_capability()
        if isinstance(caps, dict) and any(f in caps for f in CPU_BF16_FLAGS):
            return any(bool(caps.get(f)) for f in CPU_BF16_FLAGS)
    except (AttributeError, RuntimeError):
        pass
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = {f for line in text.splitlines() if line.startswith("flags")
             for f in line.partition(":")[2].split()}
    return any(f in flags for f in CPU_BF16_FLAGS)


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The precision models run at on ``device``: ``fp32``, ``bf16`` or ``fp16``.

    ``auto`` is fp16 on CUDA, bf16 on a CPU with native bf16 (:func:`cpu_native_bf16`), else
    fp32. Refused with the fix in the message: fp16 on a CPU (PyTorch has no fast CPU fp16
    path for these models: it is emulated and slower than fp32), bf16 on a CPU without native
    bf16 (emulated, slower than fp32) or on a GPU that lacks it.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if precision == "auto":
        return "fp16" if cuda else ("bf16" if cpu_native_bf16() else "fp32")
    if precision == "fp16" and not cuda:
        raise UsageError("--precision fp16 is for CUDA only: on a CPU PyTorch emulates fp16 for "
                         "these models, slower than fp32. On a CPU use --precision bf16 (needs "
                         "AVX512_BF16 or AMX), fp32, or auto")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--precision bf16: the GPU {torch.cuda.get_device_name(dev)} has no "
                         "bf16 support; use --precision fp16 (or auto) on it")
    if precision == "bf16" and not cuda and not cpu_native_bf16():
        raise UsageError("--precision bf16 needs a CPU with AVX512_BF16 or AMX-BF16 (this one "
                         "has neither, so bf16 would be emulated and slower than fp32); use "
                         "--precision fp32 or auto")
    return precision


def sample_indices(clip_len: int, start: int, end: int) -> np.ndarray:
    """Decode-order frame indices a shot [start, end) gives a model taking ``clip_len`` frames:
    the centre frame ``start + (end - start) // 2`` for image models (``clip_len`` 1), else
    ``numpy.linspace(start, end - 1, clip_len).round()``."""
    if clip_len <= 1:
        return np.array([start + (end - start) // 2], dtype=np.int64)
    return np.linspace(start, end - 1, clip_len).round().astype(np.int64)


class FramePrep:
    """Reduces one decoded RGB frame to a model's input geometry (uint8, H x W x 3).

    Follows ``weights.transforms()``: a resize (shorter side for image models, exact size for
    video models) then a center crop. The decoded frame may still need a display rotation; it is
    resized first (to the swapped size) and rotated once small.

    With ``full_frame`` the whole displayed frame is resized to the crop size instead (no crop;
    the aspect ratio is not kept), the view of ``--full-frame-grids``.
    """

    def __init__(self, transforms: nn.Module, full_frame: bool = False):
        self.resize_size = list(transforms.resize_size)
        self.crop_size = list(transforms.crop_size)
        if len(self.crop_size) == 1:
            self.crop_size = self.crop_size * 2
        # Image transforms resize with antialiasing, video transforms without.
        self.antialias = bool(getattr(transforms, "antialias", False))
        self.interpolation = transforms.interpolation
        self.full_frame = full_frame
        # torchvision (imported here, not with the module: runs without image models skip it)
        from torchvision.transforms.v2 import functional as TF

        self._torch_resize = self.antialias or self.interpolation != TF.InterpolationMode.BILINEAR

    @property
    def view(self) -> str:
        """The grid view this reducer gives (:func:`vtx.features.grid_view`): ``full-frame``,
        or ``crop=<crop>/<resize>``."""
        return FULL_FRAME if self.full_frame else f"crop={self.crop_size[0]}/{self.resize_size[0]}"

    def display_box(self, h: int, w: int) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)``: the part of a displayed frame of size (h, w) that the output
        shows, in displayed pixels."""
        if self.full_frame:
            return 0.0, 0.0, float(w), float(h)
        oh, ow = self.output_size(h, w)
        ch, cw = self.crop_size
        top, left = int(round((oh - ch) / 2.0)), int(round((ow - cw) / 2.0))
        sy, sx = h / oh, w / ow  # displayed pixels per resized pixel
        return left * sx, top * sy, (left + cw) * sx, (top + ch) * sy

    def region(self, width: int, height: int, rotation: int = 0) -> tuple[float, ...]:
        """``(x0, y0, x1, y1)``: the part of the **coded** frame (``width`` x ``height``, before
        the display rotation of ``rotation`` degrees counter-clockwise) that the output shows."""
        k = int(round(rotation / 90.0)) % 4
        dh, dw = (width, height) if k % 2 else (height, width)  # displayed size
        x0, y0, x1, y1 = self.display_box(dh, dw)
        # displayed = numpy.rot90(coded, k): map the box's corners back to coded pixels
        if k == 1:
            return width - y1, x0, width - y0, x1
        if k == 2:
            return width - x1, height - y1, width - x0, height - y0
        if k == 3:
            return y0, height - x1, y1, height - x0
        return x0, y0, x1, y1

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """Resized (h, w) for a displayed frame of size (h, w), as torchvision computes it."""
        if len(self.resize_size) == 1:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.resize_size[0], int(self.resize_size[0] * long / short)
            return (new_long, new_short) if w <= h else (new_short, new_long)
        return self.resize_size[0], self.resize_size[1]

    def __call__(self, rgb: np.ndarray, rotation: int = 0) -> np.ndarray:
        k = int(round(rotation / 90.0)) % 4
        h, w = rgb.shape[:2]
        dh, dw = (w, h) if k % 2 else (h, w)  # displayed size
        oh, ow = tuple(self.crop_size) if self.full_frame else self.output_size(dh, dw)
        rh, rw = (ow, oh) if k % 2 else (oh, ow)  # resize target in decoded orientation
        if self._torch_resize:
            # torchvision's own resize on the uint8 frame, with the transform's interpolation:
            # exactly the weights' transform (and cheaper than OpenCV's INTER_AREA).
            t = torch.from_numpy(rgb).permute(2, 0, 1)  # (3, H, W) uint8
            from torchvision.transforms.v2 import functional as TF

            small = TF.resize(t, [rh, rw], interpolation=self.interpolation,
                              antialias=self.antialias).permute(1, 2, 0).numpy()
        else:  # torchvision's video transforms resize bilinearly without antialiasing
            small = cv2.resize(rgb, (rw, rh), interpolation=cv2.INTER_LINEAR)
        if k:
            small = np.rot90(small, k=k)
        if self.full_frame:
            return np.ascontiguousarray(small)
        ch, cw = self.crop_size
        top = int(round((oh - ch) / 2.0))
        left = int(round((ow - cw) / 2.0))
        if top < 0 or left < 0:
            raise ValueError(f"resize {oh}x{ow} is smaller than the crop {ch}x{cw}")
        return np.ascontiguousarray(small[top:top + ch, left:left + cw])


def grid_prep(vit_weights: str | None = None, full_frame: bool = False) -> FramePrep:
    """The grid view of a run: the frame reducer of the built-in ViT run (``--vit-weights``
    member, default ``IMAGENET1K_V1``), whose output region every spatial grid covers
    (:meth:`FramePrep.region`, :attr:`FramePrep.view`)."""
    spec = FEATURES["vit_patches"].with_weights(vit_weights)
    return FramePrep(weights_member(spec.builder, spec.weights).transforms(), full_frame)


def view_prep(view: str) -> FramePrep:
    """The frame reducer of a recorded grid view (``full-frame`` or ``crop=<crop>/<resize>``),
    e.g. to extract the grids of a checkpoint's cache again (``vtx predict``)."""
    if view == FULL_FRAME:
        return grid_prep(full_frame=True)
    try:
        crop, resize = (int(n) for n in view.removeprefix("crop=").split("/"))
    except ValueError:
        raise UsageError(f"unknown grid view {view!r}; expected full-frame or "
                         f"crop=<crop>/<resize>") from None
    prep = grid_prep()
    prep.crop_size, prep.resize_size = [crop, crop], [resize]
    return prep


class ThumbnailPrep:
    """Reduces a frame to a thumbnail ``height`` pixels high, rotated for display."""

    def __init__(self, height: int = 96):
        self.height = height

    def __call__(self, rgb: np.ndarray, rotation: int = 0) -> np.ndarray:
        k = int(round(rotation / 90.0)) % 4
        h, w = rgb.shape[:2]
        dh, dw = (w, h) if k % 2 else (h, w)
        tw = max(1, round(dw * self.height / dh))
        rh, rw = (tw, self.height) if k % 2 else (self.height, tw)
        small = cv2.resize(rgb, (rw, rh), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(np.rot90(small, k=k)) if k else small


class Backbone(nn.Module):
    """One frozen model run: uint8 frames (or log-mel examples) in, feature rows out.

    Args:
        specs: the features this run computes (all share one ``model_key``; ``vit`` and
            ``vit_patches`` share ViT-B/16).
        model: the network, classifier removed.
        transforms: ``weights.transforms()`` (None for VGGish).
        identity: the weights identity (``FeatureSpec.identity``).
        weights_file: the official file name(s), empty for random weights.
        pca: VGGish's PCA postprocessing, or None.

    ``forward`` returns ``{feature name: float32 (B, *row shape)}``. The model runs in fp32
    until :meth:`set_precision` (which :func:`load_backbones` calls).
    """

    def __init__(self, specs: Sequence[FeatureSpec], model: nn.Module,
                 transforms: nn.Module | None, identity: str, weights_file: str,
                 pca: nn.Module | None = None):
        super().__init__()
        self.specs = tuple(specs)
        first = self.specs[0]
        self.key, self.kind, self.level, self.clip_len = (first.model_key, first.kind,
                                                          first.level, first.clip_len)
        self.model = model
        self.identity = identity
        self.weights_file = weights_file
        self.pca = pca
        self.prep = FramePrep(transforms) if transforms is not None else None
        mean = transforms.mean if transforms is not None else [0.0, 0.0, 0.0]
        std = transforms.std if transforms is not None else [1.0, 1.0, 1.0]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1, 1))
        self.precision = "fp32"  # resolved: fp32, bf16 or fp16 (set_precision)
        self.input_dtype = torch.float32  # what the model's own weights take
        self.autocast_dtype: torch.dtype | None = None  # CUDA mixed precision
        self.memory_format = torch.contiguous_format

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def set_precision(self, precision: str) -> Backbone:
        """Run at ``precision`` (``fp32``, ``bf16`` or ``fp16``, resolved for this backbone's
        device by :func:`resolve_precision`); call after moving the backbone to its device.

        On a CPU, bf16 casts the model's weights (the normalisation and VGGish's PCA stay fp32)
        and the builders in :data:`CHANNELS_LAST` switch to channels-last; on CUDA the fp32
        model runs under ``torch.autocast`` at fp16 or bf16.
        """
        if precision not in TORCH_DTYPES:
            raise UsageError(f"unresolved precision {precision!r}; pass it through "
                             f"resolve_precision first")
        dtype = TORCH_DTYPES[precision]
        self.precision = precision
        if self.device.type == "cuda":
            self.autocast_dtype = None if precision == "fp32" else dtype
            return self
        if precision == "fp16":
            raise UsageError("--precision fp16 is for CUDA only; use bf16, fp32 or auto on a CPU")
        self.input_dtype = dtype
        self.memory_format = CHANNELS_LAST.get(self.specs[0].builder, torch.contiguous_format)
        self.model.to(dtype=dtype, memory_format=self.memory_format)
        return self

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args:
            x: uint8 frames (B, T, H, W, 3), T = clip_len; for VGGish float (B, 96, 64).
        """
        autocast = self.autocast_dtype is not None and x.device.type == "cuda"
        with torch.autocast("cuda", dtype=self.autocast_dtype or torch.float16, enabled=autocast):
            out = self.run(x)
        return {k: v.float() for k, v in out.items()}

    def run(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.kind == "audio":
            emb = self.model(x.to(self.input_dtype)).float()
            return {self.specs[0].name: self.pca(emb) if self.pca is not None else emb}
        x = x.permute(0, 4, 1, 2, 3).float().div_(255.0)  # (B, 3, T, H, W)
        x = (x - self.mean) / self.std
        if self.clip_len == 1:
            x = x[:, :, 0]  # (B, 3, H, W)
        x = x.to(self.input_dtype).contiguous(memory_format=self.memory_format)
        outputs = {s.output for s in self.specs}
        if "patches" not in outputs:
            y = self.model(x)  # (B, D): the classifier's input
            return {s.name: y for s in self.specs}
        vit = self.model  # torchvision VisionTransformer, heads removed
        tokens = vit.conv_proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)
        cls = vit.class_token.expand(tokens.shape[0], -1, -1)
        tokens = vit.encoder(torch.cat([cls, tokens], dim=1))  # (B, 1 + N, D), after final LN
        return {s.name: tokens[:, 1:] if s.output == "patches" else tokens[:, 0]
                for s in self.specs}

    def attrs(self, name: str | None = None) -> dict:
        """Dataset attrs that identify how feature ``name`` (default: the first) was made."""
        spec = next((s for s in self.specs if s.name == name), self.specs[0])
        d = {"model": spec.builder, "weights": self.identity, "weights_file": self.weights_file,
             "dim": spec.dim, "sampling": spec.sampling, "level": spec.level,
             "precision": self.precision}
        if spec.output == "patches":
            d["layout"] = "(n_frames, n_patches, dim), patches in row-major grid order"
        if self.pca is not None:
            d["postprocess"] = "official PCA + whitening, clip [-2, 2], quantised 0..255"
        return d


def load_backbones(specs: Sequence[FeatureSpec], weights: str = "official",
                   weights_dir: str | Path | None = None, device: torch.device | str = "cpu",
                   seed: int = 0, pca: bool = False, full_frame: bool = False,
                   precision: str = "fp32") -> dict[str, Backbone]:
    """One frozen backbone per model run the features need, keyed by ``model_key``.

    Args:
        specs: the features (codec features need no model and are skipped).
        weights: "official" (through the torch hub cache) or "random" (seeded initialisation,
            for offline smoke tests; marked ``random`` in the cache).
        weights_dir: folder holding the weight files [default: ``$TORCH_HOME/hub/checkpoints``].
        device: where the models run.
        seed: seed of the random initialisation.
        pca: VGGish only: apply the official PCA postprocessing.
        full_frame: the built-in ViT run sees the whole frame (``--full-frame-grids``,
            :func:`vtx.features.follows_grid_view`); other models keep their crop.
        precision: ``--precision`` (:data:`PRECISIONS`), resolved for ``device`` by
            :func:`resolve_precision`; ``fp32`` (the default here) runs the models as loaded,
            ``vtx extract`` and ``vtx predict`` pass theirs (default ``auto``).
    """
    if weights not in ("official", "random"):
        raise UsageError(f"--weights must be 'official' or 'random', not {weights!r}")
    precision = resolve_precision(precision, device)
    groups: dict[str, list[FeatureSpec]] = {}
    for spec in specs:
        if spec.kind != "codec":
            groups.setdefault(spec.model_key, []).append(spec)
    out = {}
    for key, group in groups.items():
        if group[0].kind == "audio":
            bb = _load_vggish(group, weights, weights_dir, seed, pca)
        else:
            bb = _load_torchvision(group, weights, weights_dir, seed)
            if full_frame and any(follows_grid_view(s) for s in group):
                bb.prep.full_frame = True
                bb.identity = group[0].identity(weights, view=FULL_FRAME)
        out[key] = bb.to(device).set_precision(precision)
    return out


def load_backbone(feature: str | FeatureSpec, weights: str = "official",
                  weights_dir: str | Path | None = None, device: torch.device | str = "cpu",
                  seed: int = 0, variant: str | None = None, patches: bool = False,
                  pca: bool = False, precision: str = "fp32") -> Backbone:
    """The backbone of one feature (a name, a ``tv:`` spec or a :class:`FeatureSpec`).

    ``variant`` picks another member of the weights enum; ``patches`` adds ``vit_patches`` to
    ``vit``'s run. See :func:`load_backbones` for the rest.
    """
    spec = parse_feature(feature) if isinstance(feature, str) else feature
    specs = [spec.with_weights(variant)]
    if patches and spec.name == "vit":
        specs.append(FEATURES["vit_patches"].with_weights(variant))
    if spec.kind == "codec":
        raise UsageError(f"feature {spec.name!r} comes from the codec and has no model")
    return next(iter(load_backbones(specs, weights, weights_dir, device, seed, pca,
                                    precision=precision).values()))


def _load_torchvision(specs: list[FeatureSpec], weights: str, weights_dir, seed: int
                      ) -> Backbone:
    from torchvision import models

    spec = specs[0]
    member = weights_member(spec.builder, spec.weights)
    kwargs = {"num_classes": len(member.meta["categories"])}
    if spec.builder.startswith("vit_"):
        kwargs["image_size"] = member.meta["min_size"][0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = models.get_model(spec.builder, weights=None, **kwargs)
    weights_file = ""
    if weights == "official":
        model.load_state_dict(fetch_state_dict(member.url, weights_dir))
        weights_file = weights_filename(member.url)
    _drop_classifier(model)
    model.eval().requires_grad_(False)
    return Backbone(specs, model, member.transforms(), spec.identity(weights), weights_file)


def _drop_classifier(model: nn.Module) -> None:
    """Replace the model's last ``Linear`` (its classifier output layer) by ``nn.Identity``, so
    the model returns the penultimate output."""
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())


def _load_vggish(specs: list[FeatureSpec], weights: str, weights_dir, seed: int, pca: bool
                 ) -> Backbone:
    from vtx.pipeline import vggish

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = vggish.VGGish()
        post = None
        if pca:
            q, _ = torch.linalg.qr(torch.randn(128, 128))
            post = vggish.VGGishPCA(q, torch.zeros(128))
    files = ""
    if weights == "official":
        model.load_state_dict(fetch_state_dict(vggish.VGGISH_URL, weights_dir))
        files = weights_filename(vggish.VGGISH_URL)
        if pca:
            params = fetch_state_dict(vggish.PCA_URL, weights_dir)
            post = vggish.VGGishPCA(params["pca_eigen_vectors"], params["pca_means"])
            files += "," + weights_filename(vggish.PCA_URL)
    model.eval().requires_grad_(False)
    identity = specs[0].identity(weights, pca=pca and weights == "official")
    return Backbone(specs, model, None, identity, files, pca=post)


def weights_filename(url: str) -> str:
    return Path(url.split("?")[0]).name


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def fetch_state_dict(url: str, weights_dir: str | Path | None = None) -> dict:
    """A state dict through the torch hub cache, exactly as torchvision's ``get_state_dict``:
    ``<weights_dir or $TORCH_HOME/hub/checkpoints>/<file name of url>``, downloaded if missing."""
    fname = weights_filename(url)
    target_dir = Path(weights_dir) if weights_dir else hub_checkpoint_dir()
    try:
        return torch.hub.load_state_dict_from_url(url, model_dir=str(target_dir), progress=False,
                                                  map_location="cpu")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
        if (target_dir / fname).exists():
            raise
        raise WeightsUnavailable(
            f"Official weights {fname} are not in {target_dir} and could not be downloaded "
            f"({getattr(e, 'reason', e)}). On a machine with internet access, download {url} and "
            f"copy it to {target_dir / fname} (or to the folder given by --weights-dir; "
            f"$TORCH_HOME sets the cache root), then rerun. For a smoke test without official "
            f"weights, pass --weights random."
        ) from e


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda[:N]`` fails clearly without CUDA."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UsageError(f"--device {device!r} is not valid; use auto, cpu or cuda[:N]") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device} was asked for but CUDA is not available here; "
                         "use --device cpu or --device auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r} is not supported; use auto, cpu or cuda[:N]")
    return dev

