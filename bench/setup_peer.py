"""Make a video_features checkout runnable as the peer of ``vggish_vs_peer.py``.

`video_features <https://github.com/v-iashin/video_features>`_ is a research repository, not a
package: its ``vggish`` extractor needs ``omegaconf``, ``tqdm``, ``resampy`` (with ``numba``),
``soundfile`` and the ``ffmpeg`` CLI, besides torch and NumPy, and downloads two checkpoints
from GitHub on first use. This script gets a checkout ready without touching vtx's
environment:

1. checks that ``CHECKOUT`` holds video_features (its ``main.py`` and
   ``models/vggish/extract_vggish.py``); get one with ``git clone`` of the address above;
2. installs the peer's extra packages with ``pip install --target SITE --no-deps`` (torch and
   NumPy are the running interpreter's, the same ones vtx uses, so both sides run the same
   torch build);
3. checks that ``ffmpeg`` is on ``PATH`` (on Debian: ``apt-get install ffmpeg``);
4. with ``--random-weights``, where the official checkpoints are not in the peer's cache
   (offline machines), writes randomly initialised ones under the official file names
   (``vggish-10086976.pth``, ``vggish_pca_params-970ea276.pth``) into the folder the peer loads
   them from: ``torch.hub`` then loads them without downloading, as vtx's own offline runs do
   (``--weights random``). Random weights cost the same compute as the official ones.

It prints the ``vggish_vs_peer.py`` options that run this peer. Usage::

    git clone https://github.com/v-iashin/video_features /tmp/video_features
    python bench/setup_peer.py /tmp/video_features --site /tmp/peer-site --random-weights
    python bench/vggish_vs_peer.py --peer-dir /tmp/video_features \\
        --peer-python "env PYTHONPATH=/tmp/peer-site $(which python)" --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

# the peer's vggish extractor imports these beyond torch and NumPy (main.py: omegaconf, tqdm;
# vggish_input: resampy, soundfile); no-deps install, so their own dependencies are listed
PACKAGES = ["omegaconf", "antlr4-python3-runtime==4.9.3", "PyYAML", "tqdm", "resampy", "numba",
            "llvmlite", "soundfile", "cffi", "pycparser"]
# where models/vggish/vggish_src/vggish_slim.py points TORCH_HOME (its folder's parent)
CHECKPOINTS = Path("models", "vggish", "hub", "checkpoints")
VGGISH_FILE = "vggish-10086976.pth"
PCA_FILE = "vggish_pca_params-970ea276.pth"


def check_checkout(checkout: Path) -> None:
    for rel in ("main.py", "models/vggish/extract_vggish.py",
                "models/vggish/vggish_src/vggish_slim.py"):
        if not (checkout / rel).is_file():
            raise SystemExit(f"{checkout} is not a video_features checkout (no {rel}); clone "
                             "https://github.com/v-iashin/video_features there first")


def install_packages(site: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
           str(site)] + PACKAGES
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def write_random_weights(checkout: Path, site: Path) -> list[Path]:
    """Random VGGish and PCA checkpoints under the official names, where none is cached."""
    folder = checkout / CHECKPOINTS
    wanted = [folder / VGGISH_FILE, folder / PCA_FILE]
    if all(p.is_file() for p in wanted):
        return []
    folder.mkdir(parents=True, exist_ok=True)
    # the peer's own model class, so that the keys and shapes are its own
    code = (
        "import sys, numpy as np, torch\n"
        "from models.vggish.vggish_src.vggish_slim import VGGish\n"
        "vggish, pca = sys.argv[1], sys.argv[2]\n"
        "torch.manual_seed(0)\n"
        "torch.save(VGGish(pretrained=False, postprocess=False).state_dict(), vggish)\n"
        "q = np.linalg.qr(np.random.default_rng(0).standard_normal((128, 128)))[0]\n"
        # the official file holds NumPy arrays, means as a flat vector (the peer reshapes)
        "torch.save({'pca_eigen_vectors': q.astype(np.float32),\n"
        "            'pca_means': np.zeros(128, np.float32)}, pca)\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(checkout), str(site),
                                                      env.get("PYTHONPATH")]))
    written = [p for p in wanted if not p.is_file()]
    tmp = [folder / f".{p.name}.tmp" for p in wanted]
    subprocess.run([sys.executable, "-c", code, str(tmp[0]), str(tmp[1])], check=True,
                   cwd=checkout, env=env)
    for t, p in zip(tmp, wanted):
        if p in written:
            os.replace(t, p)
        else:
            t.unlink()
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkout", type=Path, help="a video_features checkout")
    p.add_argument("--site", type=Path, required=True,
                   help="folder for the peer's extra packages (pip --target)")
    p.add_argument("--skip-install", action="store_true",
                   help="the packages are already in --site")
    p.add_argument("--random-weights", action="store_true",
                   help="write random checkpoints under the official names where none is "
                        "cached (offline machines)")
    args = p.parse_args(argv)
    checkout, site = args.checkout.resolve(), args.site.resolve()
    check_checkout(checkout)
    if not args.skip_install:
        install_packages(site)
    if shutil.which("ffmpeg") is None:
        raise SystemExit("the peer calls the ffmpeg CLI, and there is none on PATH: install it "
                         "(Debian: apt-get install ffmpeg)")
    if args.random_weights:
        for path in write_random_weights(checkout, site):
            print(f"wrote random weights: {path}")
    peer_python = shlex.join(["env", f"PYTHONPATH={site}", sys.executable])
    print("run the peer with:\n  python bench/vggish_vs_peer.py --peer-dir "
          f"{shlex.quote(str(checkout))} --peer-python {shlex.quote(peer_python)}")


if __name__ == "__main__":
    main()
