"""``vtx demo``: the main job end to end on synthetic trailers, offline.

1. Synthesise a labelled set of short trailer-like videos (:mod:`vtx.train.demo_data`): shots of
   distinct scenes, motion and sound, with labels that depend on which shots appear, on their
   motion, and on their *order* (``chase_before_crash``).
2. ``vtx extract`` them into an HDF5 cache (the real stage-1 pipeline).
3. ``vtx train-head`` STAN and the mean-pooling baseline, then ``vtx evaluate`` both on the test
   split.
4. ``vtx predict --explain`` on a held-out video.
5. Print the comparison: the order label is where a temporal head must beat pooling, and the
   margin by which it does.

The training recipe is the one that learns the order label reliably on this data (measured
over seeds, see docs/BENCHMARKS.md, "vtx demo"): a small STAN (``d_model`` 64, no dropout),
batches of 32 videos and a learning rate of 1e-3. Order is learned after a plateau (the bag
labels are fitted first); larger models, smaller batches, dropout or labels no head can see
lengthen that plateau past the demo's epochs.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vtx.errors import UsageError, WeightsUnavailable
from vtx.io.reader import CacheReader
from vtx.features import FEATURES, weights_member
from vtx.pipeline.backbones import fetch_state_dict
from vtx.pipeline.extract import DEFAULT_FEATURES, ExtractConfig, extract

ORDER_LABEL = "chase_before_crash"


@dataclass
class DemoConfig:
    """Options of ``vtx demo`` (the CLI sets the first six).

    Attributes:
        out: folder for the videos, the cache, the runs and the explanation.
        n_videos: labelled videos (plus one held out); at least 24.
        epochs: training epochs per head (best.pt is picked on the val split).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        progress: progress on stderr (:mod:`vtx.progress`).
        seed: seeds the design of the videos, the random weights, the splits and training.
        features: the cache's features; STAN's streams and mean pooling's inputs follow them
            (``("resnet18",)`` gives a faster variant with STAN's spatial stream alone).
        labels: the labels trained and compared [default: all of ``demo_data.LABELS``].
        batch_size: videos per training step.
        lr: peak learning rate.
        d_model: STAN's token width.
    """

    out: Path = Path("demo-out")
    n_videos: int = 128
    epochs: int = 80
    device: str = "auto"
    progress: bool = True
    seed: int = 0
    features: tuple[str, ...] = DEFAULT_FEATURES
    labels: tuple[str, ...] | None = None
    batch_size: int = 32
    lr: float = 1e-3
    d_model: int = 64


@dataclass
class DemoResult:
    cache: Path
    weights: str
    metrics: dict  # head -> evaluate_run result
    order_ap: dict  # head -> AP of the order-dependent label on the test split
    explanation: Path | None
    prediction: dict | None

    @property
    def margin(self) -> float:
        """STAN's AP minus mean pooling's on the order label (test split)."""
        return self.order_ap["stan"] - self.order_ap["meanpool"]

    def to_dict(self) -> dict:
        return {"cache": str(self.cache), "weights": self.weights,
                "order_label": ORDER_LABEL, "order_ap": self.order_ap,
                "margin": round(self.margin, 6),
                "mAP_weighted": {h: m["mAP_weighted"] for h, m in self.metrics.items()},
                "explanation": str(self.explanation) if self.explanation else None,
                "prediction": self.prediction}


STREAMS = {("resnet18",): "spatial", ("r2plus1d",): "temporal"}
"""STAN's streams for a demo cache of one feature (both streams otherwise)."""


def head_options(config: DemoConfig) -> dict[str, dict]:
    """The head options of the demo's STAN and mean pooling, for ``config.features``."""
    features = tuple(config.features)
    stan = {"d_model": config.d_model, "dropout": 0.0}
    if features in STREAMS:
        stan["streams"] = STREAMS[features]
    return {"stan": stan, "meanpool": {"dropout": 0.0, "features": list(features)}}


def official_weights_available(features=DEFAULT_FEATURES) -> bool:
    """True when every feature's official weights load (from the hub cache or a download)."""
    try:
        for name in features:
            spec = FEATURES[name]
            fetch_state_dict(weights_member(spec.builder, spec.weights).url)
    except WeightsUnavailable:
        return False
    return True


def run_demo(config: DemoConfig, say: Callable[[str], None] | None = None) -> DemoResult:
    from vtx.train.demo_data import HELD_OUT_PREFIX, LABELS, design_dataset, write_dataset
    from vtx.train.evaluate import evaluate_run
    from vtx.train.predict import PredictConfig, predict
    from vtx.train.trainer import TrainConfig, train_head

    say = say or (lambda msg: print(msg, file=sys.stderr))
    out = Path(config.out)
    videos_dir = out / "videos"
    compared = [n for n in LABELS if config.labels is None or n in config.labels]
    if ORDER_LABEL not in compared:
        raise UsageError(f"the demo compares the heads on {ORDER_LABEL}; keep it in the labels")
    design = design_dataset(config.n_videos, seed=config.seed)
    labels = write_dataset(videos_dir, design, labels=compared)
    held_out = [v for v in design if v.name.startswith(HELD_OUT_PREFIX)]
    counts = {s: sum(v.split == s for v in design) for s in ("train", "val", "test")}
    say(f"[demo] 1/5 synthesised {len(design)} labelled trailers in {videos_dir} "
        f"(train {counts['train']}, val {counts['val']}, test {counts['test']}; labels: "
        f"{', '.join(compared)}; {ORDER_LABEL} depends on shot order only)")

    weights = "official"
    if not official_weights_available(config.features):
        weights = "random"
        say("[demo] " + "!" * 72)
        say("[demo] OFFICIAL WEIGHTS ARE NOT AVAILABLE (offline, not in the torch hub cache).")
        say("[demo] FALLING BACK TO --weights random: the pipeline is real, the features come")
        say("[demo] from randomly initialised backbones, and the cache marks them weights=random.")
        say("[demo] " + "!" * 72)
    cache = out / "feats.h5"
    summary = extract(ExtractConfig(videos=videos_dir, out=cache, features=config.features,
                                    weights=weights, device=config.device,
                                    progress=config.progress, seed=config.seed))
    say(f"[demo] 2/5 extract: {summary.line()}")

    metrics, order_ap = {}, {}
    for head, options in head_options(config).items():
        run_dir = out / "runs" / head
        shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own run of an earlier demo
        t0 = time.perf_counter()
        result = train_head(TrainConfig(head=head, features=cache, labels=labels, out=run_dir,
                                        epochs=config.epochs, batch_size=config.batch_size,
                                        lr=config.lr, patience=config.epochs,
                                        device=config.device, seed=config.seed,
                                        task="multilabel", head_options=options,
                                        progress=config.progress),
                            log=lambda m: None)
        say(f"[demo] 3/5 train-head {head}: {result.line()} ({time.perf_counter() - t0:.0f} s)")
        m = evaluate_run(run_dir, cache, labels, split="test", device=config.device,
                         log=lambda m: None, progress=False)
        metrics[head] = m
        order_ap[head] = next(r["AP"] for r in m["per_class"] if r["class"] == ORDER_LABEL)
    say(f"[demo] 4/5 evaluate on the test split ({metrics['stan']['n_videos']} videos)")

    explanation, prediction = None, None
    if held_out:
        video = videos_dir / f"{held_out[0].name}.mp4"
        explanation = out / "explain.png"
        preds = predict(PredictConfig(videos=(video,), model=out / "runs" / "stan" / "best.pt",
                                      device=config.device, explain=explanation, progress=False))
        prediction = preds[0].to_dict()
        shown = ", ".join(f"{n} {p:.2f}" for n, p in preds[0].labels[:4])
        truth = [n for n in held_out[0].labels if n in compared] or ["none"]
        say(f"[demo] 5/5 predict {video.name}: {shown} (true: "
            f"{', '.join(truth)}); explanation -> {explanation}")

    say("[demo] comparison on the test split (AP per label; mAP weighted by support):")
    say(f"[demo]   {'label':<22}" + "".join(f"{h:>10}" for h in metrics))
    for label in compared:
        row = [next(r["AP"] for r in metrics[h]["per_class"] if r["class"] == label)
               for h in metrics]
        mark = "  <- order-dependent" if label == ORDER_LABEL else ""
        say(f"[demo]   {label:<22}" + "".join(f"{v:>10.3f}" for v in row) + mark)
    say(f"[demo]   {'mAP_weighted':<22}" +
        "".join(f"{metrics[h]['mAP_weighted']:>10.3f}" for h in metrics))
    margin = order_ap["stan"] - order_ap["meanpool"]
    verdict = (f"beats mean pooling by {margin:.3f} AP" if margin > 0 else
               "does NOT beat mean pooling")
    say(f"[demo] STAN {verdict} on {ORDER_LABEL}: AP {order_ap['stan']:.3f} vs "
        f"{order_ap['meanpool']:.3f} (mean pooling cannot see shot order).")
    if weights == "random":
        say("[demo] (features from RANDOM weights; see the warning above)")
    return DemoResult(cache, weights, metrics, order_ap, explanation, prediction)


def describe_cache(path: Path) -> str:
    lines = [f"[demo] cache {path}:"]
    with CacheReader(path) as cache:
        for v in cache.videos():
            feats = ", ".join(f"{n} {cache.shape(v.key, n)}" for n in v.datasets
                              if n in FEATURES)
            lines.append(f"[demo]   {v.path}: {v.attrs['n_frames']} frames, "
                         f"{v.attrs['duration_s']:.2f} s, {cache.shape(v.key, 'shots')[0]} "
                         f"shots; {feats}")
    return "\n".join(lines)

