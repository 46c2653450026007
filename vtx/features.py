"""The feature registry: what every stage-1 feature is, written down once.

Each :class:`FeatureSpec` says which model makes a feature (a torchvision builder name and its
weights enum member, or VGGish, or the codec), on which row axis its rows lie (``shot``,
``frame`` or ``audio``), which datasets it writes with their row shapes and dtypes, how it
samples frames, and how its weights identity reads. Extraction, the cache writer, the stage-2
reader, the heads' default widths, ``vtx predict`` and ``vtx features`` all ask this module;
``docs/FORMAT.md``'s feature tables are checked against it by the tests.

Besides the built-in features in :data:`FEATURES`, any torchvision classification model is a
feature, named ``tv:<builder>[:<WEIGHTS>][@shot|@frame]`` (:func:`parse_feature`):

* image models run on each shot's centre frame (``@shot``, the default) or on every sampled
  frame (``@frame``); video models (``torchvision.models.video``) run on one clip of
  :data:`VIDEO_CLIP_LEN` frames per shot, ``@shot:N`` for N frames;
* the weights default to the enum's ``DEFAULT``; the stored row is the penultimate output (the
  input of the model's last ``Linear``, i.e. the classifier's input, timm's ``pre_logits``).

Adding a built-in feature takes one entry in :data:`FEATURES` (plus, for a new kind of model,
one module that computes it; see ``docs/FORMAT.md``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass

from vtx.errors import UsageError

__all__ = [
    "DatasetSpec", "FeatureSpec", "FEATURES", "ALL_FEATURES", "DEFAULT_FEATURES", "LEVELS",
    "KINDS", "VIDEO_CLIP_LEN", "TV_PREFIX", "parse_feature", "parse_features", "resolve",
    "dataset_spec", "dataset_level", "weights_member", "parse_identity", "is_weight_free",
    "default_dims", "feature_width", "bytes_per_minute", "describe", "catalogue",
    "FULL_FRAME", "LEGACY_VIEW", "follows_grid_view", "grid_view",
]

FULL_FRAME = "full-frame"
"""The grid view of ``--full-frame-grids``: every spatial grid (and the ViT) covers the whole
display-rotated frame, resized to a square without a crop."""

LEGACY_VIEW = "legacy"
"""The grid view of codec datasets written before grid views existed: the whole coded frame,
not rotated for display, resized to the grid."""

LEVELS = ("shot", "frame", "audio")
"""Row axes: one row per shot (aligned with ``shots``), per sampled frame (``frames``), or per
audio example (``<name>_times``)."""

KINDS = ("image", "video", "audio", "codec")
"""How a feature is computed: an image model on single frames, a video model on clips, VGGish on
log-mel examples, or straight from the codec's motion vectors (no model)."""

VIDEO_CLIP_LEN = 16
"""Default clip length of ``tv:`` video models: torchvision's Kinetics models are evaluated on
16-frame clips (``clip_len=16`` in their weights' docs)."""

TV_PREFIX = "tv:"

#: Settings a row shape can name instead of a number (looked up in :meth:`FeatureSpec.shape`).
SHAPE_SETTINGS = ("dim", "n_patches", "motion_grid", "residual_size")


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset a feature writes under ``/videos/<key>``.

    Attributes:
        name: dataset name.
        shape: row shape; a string names a setting (:data:`SHAPE_SETTINGS`).
        dtype: numpy dtype name, or ``"feature"`` for the run's ``--dtype``.
        meaning: one line for ``docs/FORMAT.md`` and ``vtx features``.
        chunk_rows: rows per HDF5 chunk (``None``: about 1 MiB).
    """

    name: str
    shape: tuple[int | str, ...]
    dtype: str
    meaning: str = ""
    chunk_rows: int | None = None


@dataclass(frozen=True)
class FeatureSpec:
    """What one feature is.

    Attributes:
        name: the name ``--features`` takes, and the name of its main dataset.
        level: row axis, one of :data:`LEVELS`.
        kind: one of :data:`KINDS`.
        builder: torchvision builder (``torchvision.models.get_model`` name), ``"VGGish"``, or
            ``None`` for the codec.
        weights: member of the builder's weights enum (``None`` for VGGish and the codec).
        dim: token width of the main dataset.
        clip_len: frames per model input: 1 for image models, N for video models, 0 otherwise.
        output: which output of the model: ``"features"`` (penultimate), or ``"patches"`` (ViT's
            patch tokens; the same model run as ``"features"``).
        datasets: the datasets written, main one first.
        sampling: the sampling rule, in words (stored as the dataset's ``sampling`` attr).
        description: one line for ``vtx features`` and the docs.
        default: in the default ``--features``.
        builtin: one of :data:`FEATURES` (``tv:`` features are not).
        spatial: the rows are a spatial grid over the frame (patch tokens, motion cells,
            residual pixels); every such grid of a cache covers one image region, the *grid
            view* (:func:`grid_view`), recorded per dataset as ``region`` and ``rotation``.
    """

    name: str
    level: str
    kind: str
    builder: str | None
    weights: str | None
    dim: int
    clip_len: int
    datasets: tuple[DatasetSpec, ...]
    sampling: str
    description: str = ""
    output: str = "features"
    default: bool = False
    builtin: bool = True
    spatial: bool = False

    @property
    def model_key(self) -> str:
        """Identifies one model run; features with the same key share it (``vit``,
        ``vit_patches``)."""
        return f"{self.builder}:{self.weights}:{self.clip_len}"

    @property
    def dataset_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.datasets)

    def with_weights(self, weights: str | None) -> "FeatureSpec":
        """The same feature with another member of its weights enum (checked)."""
        if weights is None or self.kind not in ("image", "video"):
            return self
        weights_member(self.builder, weights)  # raises UsageError when unknown
        return dataclasses.replace(self, weights=weights)

    def shape(self, dataset: DatasetSpec, settings: dict | None = None) -> tuple[int, ...]:
        """Concrete row shape of ``dataset`` (``settings`` fills named sizes)."""
        values = {"dim": self.dim, "n_patches": 196, "motion_grid": 14, "residual_size": 56}
        values.update(settings or {})
        return tuple(int(values[s]) if isinstance(s, str) else int(s) for s in dataset.shape)

    def identity(self, weights: str = "official", pca: bool = False, gop: bool = False,
                 view: str | None = None) -> str:
        """The weights identity recorded in the cache (root ``features`` and the ``weights``
        attr): torchvision's full enum name (``ResNet18_Weights.IMAGENET1K_V1``, read back with
        :func:`parse_identity`), ``random``, ``torchvggish-v0.1[+pca]`` or
        ``codec[+gop-normalised]``; then the grid view where it changes the feature
        (:func:`follows_grid_view`): ``+crop=224/256`` or ``+full-frame`` for the codec's
        grids, ``+full-frame`` for the built-in ViT run (its default view is its own crop)."""
        flag = ""
        if view is not None and follows_grid_view(self):
            flag = f"+{view}" if self.kind == "codec" or view == FULL_FRAME else ""
        if self.kind == "codec":
            return "codec" + ("+gop-normalised" if gop else "") + flag
        if weights == "random":
            return "random" + flag
        if self.kind == "audio":
            return "torchvggish-v0.1" + ("+pca" if pca else "")
        member = weights_member(self.builder, self.weights)
        return f"{type(member).__name__}.{member.name}" + flag


def _ds(name, shape, dtype, meaning, chunk_rows=None) -> DatasetSpec:
    return DatasetSpec(name, tuple(shape), dtype, meaning, chunk_rows)


_CENTRE = "shot center frame: start + (end - start) // 2"
_FRAMES = "sampled frames (see frames / frame_times)"

FEATURES: dict[str, FeatureSpec] = {
    "resnet18": FeatureSpec(
        name="resnet18", level="shot", kind="image", builder="resnet18",
        weights="IMAGENET1K_V1", dim=512, clip_len=1, sampling=_CENTRE, default=True,
        datasets=(_ds("resnet18", ("dim",), "feature",
                      "ResNet18 penultimate (average-pooled) output on the shot's centre frame"),),
        description="ResNet18 on each shot's centre frame (STAN's spatial stream)"),
    "r2plus1d": FeatureSpec(
        name="r2plus1d", level="shot", kind="video", builder="r2plus1d_18",
        weights="KINETICS400_V1", dim=512, clip_len=12, default=True,
        sampling="12 frames per shot at numpy.linspace(start, end - 1, 12).round()",
        datasets=(_ds("r2plus1d", ("dim",), "feature",
                      "R(2+1)D-18 penultimate output on 12 frames spread over the shot"),),
        description="R(2+1)D-18 on 12 frames per shot (STAN's temporal stream)"),
    "vit": FeatureSpec(
        name="vit", level="frame", kind="image", builder="vit_b_16", weights="IMAGENET1K_V1",
        dim=768, clip_len=1, sampling=_FRAMES,
        datasets=(_ds("vit", ("dim",), "feature",
                      "ViT-B/16 CLS token after the encoder's final LayerNorm"),),
        description="ViT-B/16 CLS token per sampled frame (VTN)"),
    "vit_patches": FeatureSpec(
        name="vit_patches", level="frame", kind="image", builder="vit_b_16",
        weights="IMAGENET1K_V1", dim=768, clip_len=1, sampling=_FRAMES, output="patches",
        datasets=(_ds("vit_patches", ("n_patches", "dim"), "float16",
                      "ViT-B/16 patch tokens of the same encoder output, row-major", 1),),
        description="ViT-B/16 patch tokens per sampled frame (TimeSformer, MEViT, MM-ViT)",
        spatial=True),
    "vggish": FeatureSpec(
        name="vggish", level="audio", kind="audio", builder="VGGish", weights=None, dim=128,
        clip_len=0, sampling="0.96 s log-mel examples of the 16 kHz mono audio (see vggish_times)",
        datasets=(_ds("vggish", ("dim",), "feature", "VGGish embedding per 0.96 s example"),
                  _ds("vggish_times", (2,), "float64",
                      "[start, end) of each example, seconds on the video's timeline")),
        description="VGGish embedding per 0.96 s of audio (STAN audio, MM-ViT)"),
    "motion": FeatureSpec(
        name="motion", level="frame", kind="codec", builder=None, weights=None, dim=2 * 14 * 14,
        clip_len=0, sampling=_FRAMES,
        datasets=(_ds("motion", (2, "motion_grid", "motion_grid"), "float32",
                      "codec motion field on a G x G grid, pixels, src = dst + motion"),
                  _ds("motion_accumulated", (2, "motion_grid", "motion_grid"), "float32",
                      "the motion traced back to the last I-frame (CoViAR)"),
                  _ds("frame_types", (), "S1", "I, P or B")),
        description="codec motion vectors per sampled frame, plain and accumulated (MEViT, MM-ViT)",
        spatial=True),
    "residual": FeatureSpec(
        name="residual", level="frame", kind="codec", builder=None, weights=None,
        dim=3 * 56 * 56, clip_len=0, sampling=_FRAMES,
        datasets=(_ds("residual", (3, "residual_size", "residual_size"), "float16",
                      "motion-compensated RGB residual, units of 1/255"),),
        description="motion-compensated residual per sampled frame (MM-ViT)", spatial=True),
}
"""The built-in features, by name."""

ALL_FEATURES = tuple(FEATURES)
DEFAULT_FEATURES = tuple(n for n, s in FEATURES.items() if s.default)

#: Datasets every cache video has (shots) or has with a frame-level feature (frames).
STRUCTURE: dict[str, DatasetSpec] = {
    "shots": _ds("shots", (2,), "int64", "[first frame, one past the last frame], decode order"),
    "shot_times": _ds("shot_times", (2,), "float64", "[start, end) of each shot, PTS seconds"),
    "frames": _ds("frames", (), "int64", "decode-order indices of the sampled frames"),
    "frame_times": _ds("frame_times", (), "float64", "PTS seconds of the sampled frames"),
}


# --------------------------------------------------------------------------- torchvision
@functools.lru_cache(maxsize=None)
def _classification_builders() -> dict[str, str]:
    """torchvision classification builders: name -> ``image`` or ``video``."""
    from torchvision import models

    out = {n: "image" for n in models.list_models(module=models)}
    out.update({n: "video" for n in models.list_models(module=models.video)})
    return out


def weights_member(builder: str, name: str | None = None):
    """The member ``name`` (default: ``DEFAULT``) of ``builder``'s weights enum.

    Raises:
        UsageError: no such builder or member; the message lists the valid ones.
    """
    from torchvision import models

    try:
        enum = models.get_model_weights(builder)
    except (ValueError, KeyError):
        raise UsageError(f"torchvision has no model {builder!r}; see "
                         f"torchvision.models.list_models()") from None
    try:
        return enum[name or "DEFAULT"]
    except KeyError:
        valid = ", ".join(m.name for m in enum)
        raise UsageError(f"{enum.__name__} has no {name!r}; valid: {valid}, DEFAULT") from None


def parse_identity(identity: str) -> tuple[object | None, set[str]]:
    """Read a weights identity back: ``(torchvision weights member or None, flags)``.

    ``ResNet18_Weights.IMAGENET1K_V1`` gives the member (``torchvision.models.get_weight``);
    ``random``, ``codec``, ``torchvggish-v0.1`` give None; ``+pca`` / ``+gop-normalised``
    suffixes are returned as flags (``{"random"}`` for random weights).
    """
    base, *flags = str(identity).split("+")
    if base == "random":
        return None, {"random", *flags}
    if base in ("codec", "torchvggish-v0.1", "unknown", ""):
        return None, set(flags)
    from torchvision import models

    try:
        return models.get_weight(base), set(flags)
    except (ValueError, KeyError, AttributeError):
        raise UsageError(f"unknown weights identity {identity!r}; expected a torchvision "
                         f"weights enum member such as ResNet18_Weights.IMAGENET1K_V1") from None


def follows_grid_view(spec: FeatureSpec) -> bool:
    """Whether the grid view changes ``spec``: the spatial grids, and every feature of the
    built-in ViT run (``vit`` shares ``vit_patches``'s encoder pass, so it sees the same frame)."""
    return spec.spatial or (spec.builtin and spec.builder == FEATURES["vit_patches"].builder)


def grid_view(spec: FeatureSpec, identity: str, default: str | None = None) -> str | None:
    """The grid view a cached spatial feature was made with, from its weights identity:
    ``full-frame``, ``crop=<crop>/<resize>`` (the ViT's centre crop: resize the shorter side to
    ``resize``, crop ``crop`` x ``crop``), or ``legacy`` for codec grids written before grid
    views existed; None for a feature that is not a spatial grid.

    Args:
        default: the crop of ViT patches made with random weights, whose identity does not name
            the weights (the run's ``--vit-weights`` crop).
    """
    if not spec.spatial:
        return None
    member, flags = parse_identity(identity)
    if FULL_FRAME in flags:
        return FULL_FRAME
    crop = next((f for f in flags if f.startswith("crop=")), None)
    if crop is not None:
        return crop
    if spec.kind == "codec":
        return LEGACY_VIEW
    if member is None:
        return default
    t = member.transforms()
    return f"crop={list(t.crop_size)[0]}/{list(t.resize_size)[0]}"


def is_weight_free(identity: str) -> bool:
    """Features made without learned weights (the codec's) go with random and official ones."""
    return str(identity).split("+")[0] == "codec"


@functools.lru_cache(maxsize=None)
def penultimate_width(builder: str) -> int:
    """Width of ``builder``'s classifier input (the input of its last ``Linear``), read from a
    model whose parameters live on the ``meta`` device (no memory, no weights)."""
    from torch import nn
    from torchvision import models

    register = nn.Module.register_parameter

    def to_meta(module, name, param):  # each parameter leaves real memory as it is created
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = to_meta
    try:
        with warnings.catch_warnings():  # googlenet / inception_v3 warn about their init
            warnings.simplefilter("ignore", FutureWarning)
            model = models.get_model(builder, weights=None)
    finally:
        nn.Module.register_parameter = register
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError(f"torchvision model {builder!r} has no Linear classifier, so it has no "
                         f"penultimate feature to store; pick another model")
    return int(linears[-1].in_features)


def _parse_tv(text: str) -> FeatureSpec:
    body = text[len(TV_PREFIX):]
    model_part, _, where = body.partition("@")
    builder, _, weights = model_part.partition(":")
    level, _, clip = (where or "shot").partition(":")
    kinds = _classification_builders()
    if builder not in kinds:
        close = [n for n in kinds if builder and (builder in n or n in builder)][:8]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"{text!r}: torchvision has no classification model {builder!r}{hint}; "
                         f"valid builders are torchvision.models.list_models(module="
                         f"torchvision.models) and torchvision.models.video")
    kind = kinds[builder]
    if level not in ("shot", "frame"):
        raise UsageError(f"{text!r}: '@{level}' is not a level; use @shot or @frame")
    if kind == "video" and level == "frame":
        raise UsageError(f"{text!r}: {builder} is a video model; it runs on one clip per shot "
                         f"(@shot), not on single frames")
    if clip and (kind != "video" or not clip.isdigit() or int(clip) < 1):
        raise UsageError(f"{text!r}: ':{clip}' sets the clip length of a video model "
                         f"(@shot:N, N >= 1)")
    clip_len = (int(clip) if clip else VIDEO_CLIP_LEN) if kind == "video" else 1
    member = weights_member(builder, weights or None)
    name = TV_PREFIX + builder + ("@frame" if level == "frame" else "")
    if kind == "video" and clip_len != VIDEO_CLIP_LEN:
        name += f"@shot:{clip_len}"
    if kind == "video":
        sampling = (f"{clip_len} frames per shot at numpy.linspace(start, end - 1, "
                    f"{clip_len}).round()")
    else:
        sampling = _CENTRE if level == "shot" else _FRAMES
    where_s = "each shot's centre frame" if (kind, level) == ("image", "shot") else (
        "each sampled frame" if kind == "image" else f"{clip_len} frames per shot")
    return FeatureSpec(
        name=name, level=level, kind=kind, builder=builder, weights=member.name,
        dim=penultimate_width(builder), clip_len=clip_len, sampling=sampling, builtin=False,
        datasets=(_ds(name, ("dim",), "feature",
                      f"torchvision {builder} penultimate output on {where_s}"),),
        description=f"torchvision {builder} ({type(member).__name__}) on {where_s}")


def parse_feature(text: str) -> FeatureSpec:
    """A built-in feature name or a ``tv:`` spec -> its :class:`FeatureSpec`.

    Raises:
        UsageError: unknown name or invalid ``tv:`` spec; the message lists what is valid.
    """
    text = text.strip()
    if text.startswith(TV_PREFIX):
        return _parse_tv(text)
    if text in FEATURES:
        return FEATURES[text]
    raise UsageError(f"unknown feature {text!r}; valid features: {', '.join(ALL_FEATURES)}, "
                     f"all, or tv:<torchvision builder>[:<WEIGHTS>][@shot|@frame] "
                     f"(e.g. tv:convnext_tiny, tv:efficientnet_b0@frame, tv:r3d_18)")


def parse_features(text: str | tuple[str, ...] | list[str]) -> tuple[FeatureSpec, ...]:
    """``--features``: a comma list (or sequence) of names and ``tv:`` specs, or ``all``."""
    names = [f.strip() for f in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    if not names:
        raise UsageError(f"no feature given; valid features: {', '.join(ALL_FEATURES)}, all, or "
                         f"tv:<torchvision builder>")
    out: dict[str, FeatureSpec] = {}
    for n in names:
        specs = [FEATURES[f] for f in ALL_FEATURES] if n == "all" else [parse_feature(n)]
        for s in specs:
            out.setdefault(s.name, s)
    return tuple(out.values())


def resolve(name: str) -> FeatureSpec | None:
    """The spec of a feature name as stored in a cache (built-in or ``tv:``), None if unknown."""
    try:
        return parse_feature(name)
    except UsageError:
        return None


def dataset_spec(name: str) -> tuple[FeatureSpec, DatasetSpec] | None:
    """The feature that writes dataset ``name``, and its :class:`DatasetSpec` (None if no
    known feature writes it)."""
    for spec in FEATURES.values():
        for d in spec.datasets:
            if d.name == name:
                return spec, d
    spec = resolve(name) if name.startswith(TV_PREFIX) else None
    return (spec, spec.datasets[0]) if spec is not None else None


def dataset_level(name: str) -> str | None:
    """Row axis of dataset ``name`` when it carries no ``level`` attr (older caches)."""
    found = dataset_spec(name)
    return found[0].level if found else None


def feature_width(name: str) -> int | None:
    """Token width of feature ``name`` (built-in or ``tv:``), None when unknown."""
    spec = resolve(name)
    return spec.dim if spec is not None else None


def default_dims() -> dict[str, int]:
    """Token width of each built-in feature (the heads' config defaults)."""
    return {n: s.dim for n, s in FEATURES.items() if s.kind != "codec"}


#: Rows per video-minute assumed by :func:`bytes_per_minute`.
ROWS_PER_MINUTE = {"shot": 20.0, "frame": 60.0, "audio": 60.0 / 0.96}


def bytes_per_minute(spec: FeatureSpec, dtype: str = "float16", settings: dict | None = None
                     ) -> int:
    """Uncompressed bytes a feature adds per video-minute: 20 shots a minute (3 s shots, typical
    of trailers), 1 frame per second, one audio example per 0.96 s."""
    import numpy as np

    rows = ROWS_PER_MINUTE[spec.level]
    total = 0.0
    for d in spec.datasets:
        itemsize = np.dtype(dtype if d.dtype == "feature" else d.dtype).itemsize
        total += rows * itemsize * math.prod(spec.shape(d, settings))
    return int(round(total))


def describe(spec: FeatureSpec, dtype: str = "float16") -> dict:
    """One feature as ``vtx features`` lists it."""
    return {"name": spec.name, "level": spec.level, "kind": spec.kind,
            "row_shape": list(spec.shape(spec.datasets[0])), "model": spec.builder,
            "weights": spec.identity("official"), "clip_len": spec.clip_len,
            "bytes_per_minute": bytes_per_minute(spec, dtype), "builtin": spec.builtin,
            "default": spec.default, "description": spec.description,
            "datasets": [{"name": d.name, "shape": list(spec.shape(d)),
                          "dtype": dtype if d.dtype == "feature" else d.dtype}
                         for d in spec.datasets]}


def catalogue() -> list[FeatureSpec]:
    """Every feature: the built-ins, then each torchvision classification model with a
    ``Linear`` classifier as ``tv:`` features (image models ``@shot`` and ``@frame``, video
    models on one clip per shot)."""
    out = list(FEATURES.values())
    for builder, kind in sorted(_classification_builders().items()):
        levels = ("", "@frame") if kind == "image" else ("",)
        for level in levels:
            try:
                out.append(parse_feature(TV_PREFIX + builder + level))
            except UsageError:  # no Linear classifier (squeezenet, s3d)
                break
    return out
