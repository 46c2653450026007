"""Frozen backbones that turn sampled frames (or audio) into feature tokens.

* Shot level, STAN (``stan.txt``, section 3): a spatial token, ResNet18 on the shot's center
  frame, and a temporal token, R(2+1)D-18 on 12 frames spread over the shot (512-d penultimate
  outputs of torchvision's models).
* Frame level, VTN / TimeSformer / MEViT (``vtn.txt``, ``timesformer.txt``, ``mevit.txt``):
  ViT-B/16's CLS token after the final LayerNorm (768-d) and, opt-in, its 14x14 patch tokens.
* Audio, MM-ViT (``mm-vit.txt``): VGGish embeddings of 0.96 s log-mel examples
  (:mod:`vtx.pipeline.vggish`).

Preprocessing is owned by torchvision: the resize and crop geometry, mean and std are read from
``weights.transforms()`` of the weight enum. For speed, frames are reduced to the model's input
size as soon as they are decoded (:class:`FramePrep`, OpenCV resize on uint8); the rest of the
transform (rescale, normalise, layout) runs batched on the model's device.

Weights resolve through the torch hub cache exactly as torchvision does
(``weights.get_state_dict``), so ``$TORCH_HOME/hub/checkpoints/<file>`` is used when present.
"""

from __future__ import annotations

import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from torch import nn
from torchvision import models
from torchvision.transforms.v2 import functional as TF
from torchvision.models import video as video_models

from vtx.errors import UsageError, WeightsUnavailable
from vtx.pipeline.vggish import VGGish


@dataclass(frozen=True)
class BackboneSpec:
    """What a model is: builder, weights, input, sampling level and the datasets it writes."""

    name: str
    builder: Callable[..., nn.Module]
    weights_enum: type | None  # torchvision enum; None for VGGish (published port)
    default_weights: str
    dim: int
    clip_len: int  # frames per token: 1 for image models, 0 for audio
    level: str  # "shot", "frame" or "audio"
    sampling: str  # human-readable rule, stored in the dataset attrs


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(
        name="resnet18", builder=models.resnet18, weights_enum=models.ResNet18_Weights,
        default_weights="IMAGENET1K_V1", dim=512, clip_len=1, level="shot",
        sampling="shot center frame: start + (end - start) // 2",
    ),
    "r2plus1d": BackboneSpec(
        name="r2plus1d", builder=video_models.r2plus1d_18,
        weights_enum=video_models.R2Plus1D_18_Weights, default_weights="KINETICS400_V1",
        dim=512, clip_len=12, level="shot",
        sampling="12 frames per shot at numpy.linspace(start, end - 1, 12).round()",
    ),
    "vit": BackboneSpec(
        name="vit", builder=models.vit_b_16, weights_enum=models.ViT_B_16_Weights,
        default_weights="IMAGENET1K_V1", dim=768, clip_len=1, level="frame",
        sampling="sampled frames (see frames / frame_times)",
    ),
    "vggish": BackboneSpec(
        name="vggish", builder=VGGish, weights_enum=None, default_weights="vggish",
        dim=128, clip_len=0, level="audio",
        sampling="0.96 s log-mel examples of the 16 kHz mono audio (see vggish_times)",
    ),
}

DERIVED = {"vit_patches": "vit"}
"""Datasets computed by another feature's model: name -> model."""


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[DERIVED.get(name, name)]
    except KeyError:
        valid = sorted(set(BACKBONES) | set(DERIVED) | {"motion", "residual"})
        raise UsageError(f"unknown feature {name!r}; valid features: {', '.join(valid)}, "
                         f"or all") from None


THUMBNAIL = "thumbnail"
"""Pseudo-feature: a small picture of the shot's center frame (for ``vtx predict --explain``)."""


def sample_indices(name: str, start: int, end: int) -> np.ndarray:
    """Decode-order frame indices a shot [start, end) contributes to feature ``name``."""
    if name == THUMBNAIL or get_spec(name).clip_len == 1:
        return np.array([start + (end - start) // 2], dtype=np.int64)
    return np.linspace(start, end - 1, get_spec(name).clip_len).round().astype(np.int64)


class FramePrep:
    """Reduces one decoded RGB frame to a model's input geometry (uint8, H x W x 3).

    Follows ``weights.transforms()``: a resize (shorter side for image models, exact size for
    video models) then a center crop. The decoded frame may still need a display rotation; it is
    resized first (to the swapped size) and rotated once small.
    """

    def __init__(self, transforms: nn.Module):
        self.resize_size = list(transforms.resize_size)
        self.crop_size = list(transforms.crop_size)
        if len(self.crop_size) == 1:
            self.crop_size = self.crop_size * 2
        # Image transforms resize with antialiasing, video transforms without.
        self.antialias = bool(getattr(transforms, "antialias", False))

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
        oh, ow = self.output_size(dh, dw)
        rh, rw = (ow, oh) if k % 2 else (oh, ow)  # resize target in decoded orientation
        if self.antialias:
            # torchvision's own antialiased bilinear resize on the uint8 frame: exactly the
            # weights' transform, and cheaper than OpenCV's INTER_AREA at non-integer ratios.
            t = torch.from_numpy(rgb).permute(2, 0, 1)  # (3, H, W) uint8
            small = TF.resize(t, [rh, rw], interpolation=TF.InterpolationMode.BILINEAR,
                              antialias=True).permute(1, 2, 0).numpy()
        else:  # torchvision's video transforms resize without antialiasing
            small = cv2.resize(rgb, (rw, rh), interpolation=cv2.INTER_LINEAR)
        if k:
            small = np.rot90(small, k=k)
        ch, cw = self.crop_size
        top = int(round((oh - ch) / 2.0))
        left = int(round((ow - cw) / 2.0))
        if top < 0 or left < 0:
            raise ValueError(f"resize {oh}x{ow} is smaller than the crop {ch}x{cw}")
        return np.ascontiguousarray(small[top:top + ch, left:left + cw])


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
    """A frozen feature extractor: uint8 frames (or log-mel examples) in, datasets out.

    ``forward`` returns ``{dataset name: float32 (B, ...)}``: one dataset for most models;
    ViT gives ``vit`` (CLS) and, when ``patches`` is set, ``vit_patches``.
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, transforms: nn.Module | None,
                 weights: str, weights_file: str, patches: bool = False,
                 pca: nn.Module | None = None):
        super().__init__()
        self.spec = spec
        self.model = model
        self.weights = weights
        self.weights_file = weights_file
        self.patches = patches
        self.pca = pca
        self.prep = FramePrep(transforms) if transforms is not None else None
        mean = transforms.mean if transforms is not None else [0.0, 0.0, 0.0]
        std = transforms.std if transforms is not None else [1.0, 1.0, 1.0]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1, 1))

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.spec.name, "vit_patches") if self.patches else (self.spec.name,)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args:
            x: uint8 frames (B, T, H, W, 3), T = clip_len; for VGGish float (B, 96, 64).
        """
        with torch.autocast("cuda", dtype=torch.float16, enabled=x.device.type == "cuda"):
            out = self._forward(x)
        return {k: v.float() for k, v in out.items()}

    def _forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.spec.level == "audio":
            emb = self.model(x.float())
            return {self.spec.name: self.pca(emb.float()) if self.pca is not None else emb}
        x = x.permute(0, 4, 1, 2, 3).float().div_(255.0)  # (B, 3, T, H, W)
        x = (x - self.mean) / self.std
        if self.spec.clip_len == 1:
            x = x[:, :, 0]  # (B, 3, H, W)
        if self.spec.name != "vit":
            return {self.spec.name: self.model(x)}
        vit = self.model
        tokens = vit._process_input(x)  # (B, N, D)
        cls = vit.class_token.expand(tokens.shape[0], -1, -1)
        tokens = vit.encoder(torch.cat([cls, tokens], dim=1))  # (B, 1 + N, D), after final LN
        out = {"vit": tokens[:, 0]}
        if self.patches:
            out["vit_patches"] = tokens[:, 1:]
        return out

    def attrs(self, name: str | None = None) -> dict:
        """Dataset attrs that identify how a dataset of this model was made."""
        name = name or self.spec.name
        d = {"model": self.spec.builder.__name__, "weights": self.weights,
             "weights_file": self.weights_file, "dim": self.spec.dim,
             "sampling": self.spec.sampling}
        if name == "vit_patches":
            d["layout"] = "(n_frames, n_patches, dim), patches in row-major grid order"
        if self.pca is not None:
            d["postprocess"] = "official PCA + whitening, clip [-2, 2], quantised 0..255"
        return d


def weights_filename(url: str) -> str:
    return Path(url.split("?")[0]).name


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_identity(name: str, weights: str, variant: str | None = None) -> str:
    """What the cache records as ``weights`` for feature ``name``."""
    spec = get_spec(name)
    if weights == "random":
        return "random"
    if spec.weights_enum is None:
        return "torchvggish-v0.1"
    return f"{spec.weights_enum.__name__}.{variant or spec.default_weights}"


def load_backbone(name: str, weights: str = "official", weights_dir: str | Path | None = None,
                  device: torch.device | str = "cpu", seed: int = 0, variant: str | None = None,
                  patches: bool = False, pca: bool = False) -> Backbone:
    """Build a frozen backbone with its classifier removed.

    Args:
        name: a key of :data:`BACKBONES`.
        weights: "official" (through the torch hub cache) or "random" (seeded initialisation,
            for offline smoke tests; marked ``random`` in the cache).
        weights_dir: folder holding the weight files [default: ``$TORCH_HOME/hub/checkpoints``].
        device: where the model runs.
        seed: seed of the random initialisation.
        variant: another member of the weights enum (e.g. ``IMAGENET1K_SWAG_E2E_V1`` for ViT).
        patches: ViT only: also return the patch tokens.
        pca: VGGish only: apply the official PCA postprocessing.
    """
    spec = get_spec(name)
    if weights not in ("official", "random"):
        raise UsageError(f"--weights must be 'official' or 'random', not {weights!r}")
    if spec.weights_enum is None:
        return _load_vggish(spec, weights, weights_dir, device, seed, pca)
    try:
        member = spec.weights_enum[variant or spec.default_weights]
    except KeyError:
        valid = ", ".join(m.name for m in spec.weights_enum)
        raise UsageError(f"{spec.weights_enum.__name__} has no {variant!r}; valid: {valid}") \
            from None
    kwargs = {}
    if name == "vit":
        kwargs["image_size"] = member.meta["min_size"][0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.builder(weights=None, **kwargs)
    if weights == "official":
        model.load_state_dict(fetch_state_dict(member.url, weights_dir))
        weights_file = weights_filename(member.url)
    else:
        weights_file = ""
    if name == "vit":
        model.heads = nn.Identity()
    else:
        model.fc = nn.Identity()
    model.eval().requires_grad_(False)
    backbone = Backbone(spec, model, member.transforms(), weights_identity(name, weights, variant),
                        weights_file, patches=patches and name == "vit")
    return backbone.to(device)


def _load_vggish(spec, weights, weights_dir, device, seed, pca) -> Backbone:
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
    identity = weights_identity("vggish", weights)
    if pca and weights == "official":
        identity += "+pca"
    backbone = Backbone(spec, model, None, identity, files, pca=post)
    return backbone.to(device)


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

