"""VGGish audio embeddings (Hershey et al., "CNN Architectures for Large-Scale Audio
Classification", ICASSP 2017), as used by MM-ViT (``mm-vit.txt``, section 3) for its audio
modality.

The network follows the TensorFlow reference: a VGG-style conv stack, then three fully connected
layers with **no ReLU after the last one** (the PyTorch port applies one; the reference does not).
Parameter names match the published PyTorch port (``features.*``, ``embeddings.*``), so its files
``vggish-10086976.pth`` and ``vggish_pca_params-970ea276.pth`` (release v0.1 of the torchvggish
project) load as published, through the torch hub cache.

``--vggish-pca`` applies the official postprocessing: PCA with whitening, clipping to [-2, 2] and
quantisation to 0..255 (truncation, as the reference's ``astype(uint8)``), stored as float.
"""

from __future__ import annotations

import torch
from torch import nn

VGGISH_URL = "https://github.com/harritaylor/torchvggish/releases/download/v0.1/vggish-10086976.pth"
PCA_URL = ("https://github.com/harritaylor/torchvggish/releases/download/v0.1/"
           "vggish_pca_params-970ea276.pth")
QUANTIZE_MIN, QUANTIZE_MAX = -2.0, 2.0


def _features() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 1
    for block in ([64], [128], [256, 256], [512, 512]):
        for width in block:
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
            channels = width
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


class VGGish(nn.Module):
    """(B, 96, 64) log-mel examples -> (B, 128) embeddings."""

    def __init__(self):
        super().__init__()
        self.features = _features()
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 6 * 4, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, 128),  # no ReLU: as the TensorFlow reference
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x[:, None])  # (B, 512, 6, 4)
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # NHWC flatten, as TensorFlow
        return self.embeddings(x)


class VGGishPCA(nn.Module):
    """The official postprocessor: PCA + whitening, clip, quantise to 0..255 (as float)."""

    def __init__(self, eigen_vectors: torch.Tensor, means: torch.Tensor):
        super().__init__()
        self.register_buffer("pca_eigen_vectors", torch.as_tensor(eigen_vectors).float())
        self.register_buffer("pca_means", torch.as_tensor(means).float().reshape(-1))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        pca = (emb - self.pca_means) @ self.pca_eigen_vectors.T
        clipped = pca.clamp(QUANTIZE_MIN, QUANTIZE_MAX)
        return torch.floor((clipped - QUANTIZE_MIN) * (255.0 / (QUANTIZE_MAX - QUANTIZE_MIN)))
