"""Frozen torchvision backbones that turn sampled frames into shot features.

STAN (``stan.txt``, section 3) represents each shot by two tokens: a spatial one, ResNet18 on the
shot's center frame, and a temporal one, R(2+1)D-18 on frames spread over the shot. Both are the
512-d penultimate outputs of torchvision's models.

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
from torchvision.models import video as video_models

from vtx.errors import UsageError, WeightsUnavailable


@dataclass(frozen=True)
class BackboneSpec:
    """What a feature is: its model, weights enum, frames per token and sampling rule."""

    name: str
    builder: Callable[..., nn.Module]
    weights_enum: type
    default_weights: str
    dim: int
    clip_len: int  # frames per token: 1 for image models
    sampling: str  # human-readable rule, stored in the dataset attrs


BACKBONES: dict[str, BackboneSpec] = {
    "resnet18": BackboneSpec(
        name="resnet18",
        builder=models.resnet18,
        weights_enum=models.ResNet18_Weights,
        default_weights="IMAGENET1K_V1",
        dim=512,
        clip_len=1,
        sampling="shot center frame: start + (end - start) // 2",
    ),
    "r2plus1d": BackboneSpec(
        name="r2plus1d",
        builder=video_models.r2plus1d_18,
        weights_enum=video_models.R2Plus1D_18_Weights,
        default_weights="KINETICS400_V1",
        dim=512,
        clip_len=12,
        sampling="12 frames per shot at numpy.linspace(start, end - 1, 12).round()",
    ),
}


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise UsageError(
            f"unknown feature {name!r}; valid features: {', '.join(sorted(BACKBONES))}"
        ) from None


def sample_indices(name: str, start: int, end: int) -> np.ndarray:
    """Decode-order frame indices a shot [start, end) contributes to feature ``name``."""
    spec = get_spec(name)
    if spec.clip_len == 1:
        return np.array([start + (end - start) // 2], dtype=np.int64)
    return np.linspace(start, end - 1, spec.clip_len).round().astype(np.int64)


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
        # Antialiased resizes are approximated by area interpolation, plain bilinear by bilinear.
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
        shrinking = rh * rw < h * w
        interp = cv2.INTER_AREA if (self.antialias and shrinking) else cv2.INTER_LINEAR
        small = cv2.resize(rgb, (rw, rh), interpolation=interp)
        if k:
            small = np.rot90(small, k=k)
        ch, cw = self.crop_size
        top = int(round((oh - ch) / 2.0))
        left = int(round((ow - cw) / 2.0))
        if top < 0 or left < 0:
            raise ValueError(f"resize {oh}x{ow} is smaller than the crop {ch}x{cw}")
        return np.ascontiguousarray(small[top:top + ch, left:left + cw])


class Backbone(nn.Module):
    """A frozen feature extractor: uint8 frames in, penultimate features out."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, transforms: nn.Module,
                 weights: str, weights_file: str):
        super().__init__()
        self.spec = spec
        self.model = model
        self.weights = weights
        self.weights_file = weights_file
        self.prep = FramePrep(transforms)
        self.register_buffer("mean", torch.tensor(transforms.mean).view(1, 3, 1, 1, 1))
        self.register_buffer("std", torch.tensor(transforms.std).view(1, 3, 1, 1, 1))

    @torch.inference_mode()
    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Args:
            frames: uint8 (B, T, H, W, 3) with T = clip_len.

        Returns:
            float32 features (B, dim).
        """
        x = frames.permute(0, 4, 1, 2, 3).float().div_(255.0)  # (B, 3, T, H, W)
        x = (x - self.mean) / self.std
        if self.spec.clip_len == 1:
            x = x[:, :, 0]  # (B, 3, H, W)
        if x.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                return self.model(x).float()
        return self.model(x)

    def attrs(self) -> dict:
        """Dataset attrs that identify how this feature was made."""
        return {
            "model": self.spec.builder.__name__,
            "weights": self.weights,
            "weights_file": self.weights_file,
            "dim": self.spec.dim,
            "sampling": self.spec.sampling,
        }


def weights_filename(url: str) -> str:
    return Path(url.split("?")[0]).name


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def load_backbone(name: str, weights: str = "official", weights_dir: str | Path | None = None,
                  device: torch.device | str = "cpu", seed: int = 0) -> Backbone:
    """Build a backbone with its classifier removed.

    Args:
        name: a key of :data:`BACKBONES`.
        weights: "official" (torchvision's enum, through the torch hub cache) or "random"
            (seeded initialisation, for offline smoke tests).
        weights_dir: directory holding the weight files; defaults to the torch hub cache
            (``$TORCH_HOME/hub/checkpoints``).
        device: where the model runs.
        seed: seed of the random initialisation.
    """
    spec = get_spec(name)
    enum_member = spec.weights_enum[spec.default_weights]
    if weights == "official":
        state = _official_state_dict(enum_member, weights_dir)
        model = spec.builder(weights=None)
        model.load_state_dict(state)
        weights_id = f"{spec.weights_enum.__name__}.{spec.default_weights}"
        weights_file = weights_filename(enum_member.url)
    elif weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = spec.builder(weights=None)
        weights_id, weights_file = "random", ""
    else:
        raise UsageError(f"--weights must be 'official' or 'random', not {weights!r}")
    model.fc = nn.Identity()
    model.eval().requires_grad_(False)
    backbone = Backbone(spec, model, enum_member.transforms(), weights_id, weights_file)
    return backbone.to(device)


def _official_state_dict(enum_member, weights_dir) -> dict:
    url = enum_member.url
    fname = weights_filename(url)
    target_dir = Path(weights_dir) if weights_dir else hub_checkpoint_dir()
    try:
        return enum_member.get_state_dict(progress=False, model_dir=str(target_dir))
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

