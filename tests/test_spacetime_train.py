"""The space-time heads (TimeSformer, MEViT, MM-ViT) train end to end on patch, motion,
residual and audio tokens of real extracted synthetic trailers, and beat chance."""

from __future__ import annotations

import numpy as np
import pytest

from vtx.pipeline.extract import ExtractConfig, extract
from vtx.pipeline.sampling import FrameSampling
from vtx.train.demo_data import LABELS, design_dataset, write_dataset
from vtx.train.evaluate import evaluate_run
from vtx.train.predict import PredictConfig, predict
from vtx.train.trainer import TrainConfig, train_head

TINY = {"d_model": 32, "n_heads": 2, "depth": 1, "dropout": 0.0}


@pytest.fixture(scope="module")
def st_cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("spacetime")
    design = design_dataset(24, seed=1)
    labels = write_dataset(d / "videos", design, size=(112, 64))
    cache = d / "feats.h5"
    s = extract(ExtractConfig(videos=d / "videos", out=cache, weights="random", device="cpu",
                              features=("vit_patches", "motion", "residual", "vggish"),
                              frames=FrameSampling(frame_rate=1.0), progress=False))
    assert s.failed == 0
    return d, cache, labels


@pytest.mark.parametrize("head,options", [
    pytest.param("timesformer", dict(TINY), id="timesformer"),
    pytest.param("mevit", dict(TINY, depth=2, time_layers=1, class_attention_layers=1),
                 id="mevit"),
    pytest.param("mmvit", {**{k: v for k, v in TINY.items() if k != "dropout"}, "variant": 3,
                           "n_frames": 8}, id="mmvit"),
])
def test_space_time_head_learns_above_chance(st_cache, head, options):
    d, cache, labels = st_cache
    r = train_head(TrainConfig(head=head, features=cache, labels=labels, out=d / head,
                               epochs=15, batch_size=8, lr=3e-3, patience=15, device="cpu",
                               max_tokens=8, head_options=options), log=lambda m: None)
    assert r.best_path.exists()
    m = evaluate_run(r.run_dir / "last.pt", cache, labels, split="train", device="cpu",
                     log=lambda m: None)
    rows = {x["class"]: x for x in m["per_class"]}
    # Chance: a constant score gives each label's AP = its positive rate.
    chance = sum(x["support"] * x["support"] / m["n_videos"] for x in rows.values()) / sum(
        x["support"] for x in rows.values())
    assert m["mAP_weighted"] > chance + 0.15, (m["mAP_weighted"], chance)
    video = next(p for p in sorted((d / "videos").glob("heldout_*.mp4")))
    pred = predict(PredictConfig(videos=(video,), model=r.run_dir / "last.pt", device="cpu",
                                 explain=d / f"{head}.png"))[0]
    assert pred.error is None and len(pred.labels) == len(LABELS)
    assert np.isclose(sum(pred.attention), 1.0, atol=1e-5)
    assert (d / f"{head}.png").exists()


def test_cli_maps_space_time_options(st_cache, tmp_path):
    from click.testing import CliRunner

    from vtx.cli.main import cli

    d, cache, labels = st_cache
    base = ["train-head", "mmvit", "--features", str(cache), "--labels", str(labels)]
    r = CliRunner().invoke(cli, base + ["--out", str(tmp_path / "a"), "--block-size", "2"])
    assert r.exit_code == 2 and "no option --block-size" in r.output
    r = CliRunner().invoke(cli, base + ["--out", str(tmp_path / "b"), "--variant", "2",
                                        "--modalities", "IM", "--depth", "1", "--d-model", "16",
                                        "--heads", "2", "--epochs", "1", "--max-tokens", "2",
                                        "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    import torch
    ckpt = torch.load(tmp_path / "b" / "best.pt", weights_only=True)
    assert ckpt["head_config"]["variant"] == 2 and ckpt["head_config"]["modalities"] == "IM"
    assert ckpt["features"].keys() == {"vit_patches", "motion"}
    # predict subsamples frames exactly as training did (--max-tokens 2)
    video = next(p for p in sorted((d / "videos").glob("heldout_*.mp4")))
    pred = predict(PredictConfig(videos=(video,), model=tmp_path / "b" / "best.pt",
                                 device="cpu", explain=tmp_path / "b.png"))[0]
    assert pred.error is None and len(pred.attention) == 2 and len(pred.token_index) == 2
    assert pred.token_index[0] == 0 and pred.token_index[1] > 1
    assert (tmp_path / "b.png").exists()
