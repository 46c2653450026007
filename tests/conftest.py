"""Shared fixtures: offline "official" weights, the real media folder and small synthetic videos.

The official-weights fixture writes randomly initialised state dicts under torchvision's official
file names into a temporary ``TORCH_HOME``; torch.hub loads a cached file without downloading
it, so the real ``--weights official`` code path runs offline. It is created once per session.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MEDIA = ROOT.parent / "shared" / "media"
# Official file names: torchvision's weight enums point at these URLs.
OFFICIAL_FILES = {
    "resnet18-f37072fd.pth": ("torchvision.models", "resnet18"),
    "r2plus1d_18-91a641e6.pth": ("torchvision.models.video", "r2plus1d_18"),
    "vit_b_16-c867db91.pth": ("torchvision.models", "vit_b_16"),
    "vggish-10086976.pth": ("vtx.pipeline.vggish", "VGGish"),
}
PCA_FILE = "vggish_pca_params-970ea276.pth"
# Official files of the torchvision models the tv: feature tests use (written on demand).
TV_FILES = {
    "mobilenet_v3_small-047dcff4.pth": ("torchvision.models", "mobilenet_v3_small"),
    "r3d_18-b3b3357e.pth": ("torchvision.models.video", "r3d_18"),
}


def write_official_weights(checkpoints: Path, names=None) -> None:
    import importlib

    checkpoints.mkdir(parents=True, exist_ok=True)
    for fname, (module, builder) in {**OFFICIAL_FILES, **TV_FILES}.items():
        if names is not None and fname not in names:
            continue
        if not (checkpoints / fname).exists():
            torch.manual_seed(1234)
            model = getattr(importlib.import_module(module), builder)()
            torch.save(model.state_dict(), checkpoints / fname)
    if (names is None or PCA_FILE in names) and not (checkpoints / PCA_FILE).exists():
        # Published layout: eigenvectors (128, 128) and means (128, 1).
        torch.manual_seed(1234)
        eigen, _ = torch.linalg.qr(torch.randn(128, 128))
        torch.save({"pca_eigen_vectors": eigen.numpy(), "pca_means": torch.randn(128, 1).numpy()},
                   checkpoints / PCA_FILE)


@pytest.fixture(scope="session", autouse=True)
def torch_home(tmp_path_factory) -> Path:
    """A TORCH_HOME with every official weight file this suite needs (random values)."""
    home = tmp_path_factory.mktemp("torch_home")
    write_official_weights(home / "hub" / "checkpoints", names=set(OFFICIAL_FILES) | {PCA_FILE})
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("TORCH_HOME", None)
    else:
        os.environ["TORCH_HOME"] = old


@pytest.fixture(scope="session")
def tv_weights(torch_home) -> Path:
    """The official file names of the tv: test models, with random values, in TORCH_HOME."""
    write_official_weights(torch_home / "hub" / "checkpoints", names=set(TV_FILES))
    return torch_home


@pytest.fixture(scope="session")
def media() -> Path:
    if not MEDIA.is_dir():
        pytest.skip(f"real test media not found at {MEDIA}")
    return MEDIA


def golden(name: str) -> dict:
    return json.loads((MEDIA / "goldens" / f"{name}.json").read_text())


def media_files() -> list[str]:
    if not MEDIA.is_dir():
        return []
    return sorted(p.name for p in MEDIA.glob("*.mp4"))


@pytest.fixture(scope="session")
def media_cache(media, torch_home, tmp_path_factory) -> Path:
    """The real media extracted once with the default features and official (fixture) weights."""
    from vtx.pipeline.extract import ExtractConfig, extract

    out = tmp_path_factory.mktemp("media_cache") / "feats.h5"
    summary = extract(ExtractConfig(videos=media, out=out, progress=False, device="cpu"))
    assert summary.failed == 0, summary.failures
    return out


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """Three small multi-shot videos (hard cuts, motion, an odd size) and their ground truth."""
    from vtx.io.synth import Shot, write_video

    d = tmp_path_factory.mktemp("synth")
    truth = {
        "a.mp4": write_video(d / "a.mp4", [Shot(20, 0, (2, 0)), Shot(25, 1, (0, 1)),
                                           Shot(18, 2, (1, 1))], size=(160, 96), fps=25),
        "sub/b.mp4": None,
        "c.mp4": write_video(d / "c.mp4", [Shot(30, 3, (1, 0))], size=(130, 74), fps=24),
    }
    (d / "sub").mkdir()
    truth["sub/b.mp4"] = write_video(d / "sub" / "b.mp4", [Shot(16, 4), Shot(22, 5, (3, 0))],
                                     size=(128, 72), fps=30)
    (d / "truth.json").write_text(json.dumps(truth, default=str))
    return d


def mounted_tmpfs(mnt: Path, size: str):
    """Mount a fresh tmpfs of ``size`` (as ``mount -o size=``) on ``mnt`` for the duration of a
    ``with`` block (Linux, root only; the test is skipped elsewhere)."""
    import contextlib
    import subprocess
    import sys

    @contextlib.contextmanager
    def mounted():
        mnt.mkdir(parents=True, exist_ok=True)
        if sys.platform != "linux" or os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root on Linux")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
        try:
            yield mnt
        finally:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)

    return mounted()


def vtx_env() -> dict:
    """Environment for running the ``vtx`` CLI in a subprocess (same TORCH_HOME, no network)."""
    env = dict(os.environ)
    env["https_proxy"] = env["HTTPS_PROXY"] = "http://127.0.0.1:9"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def copy_cache(src: Path, dst: Path) -> Path:
    """Copy a cache as docs/FORMAT.md says: the index with its parts folder."""
    import shutil
    shutil.copyfile(src, dst)
    parts = Path(str(src) + ".parts")
    if parts.is_dir():
        shutil.copytree(parts, Path(str(dst) + ".parts"), dirs_exist_ok=True)
    return dst
