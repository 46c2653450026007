"""Stage 2 streams tokens from the cache: nothing is read up front, memory stays within the
token cache's budget, and DataLoader worker processes give the same training as reading in
the training process."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from test_train import config, make_cache, quiet
from vtx.io.cache import compact_cache
from vtx.train.dataset import StreamedTokens, TokenSource, load_cache
from vtx.train.labels import load_labels
from vtx.train.trainer import train_head


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("stream"), n_videos=12,
                      frame_dims={"vit": 16}, audio_dim=8)


def test_load_cache_reads_no_tokens_and_streams_them_exactly(small):
    cache, labels, _ = small
    data = load_cache(cache, load_labels(labels), ("resnet18", "r2plus1d"), "shot", log=quiet)
    source = data.videos[0].tokens.source
    assert all(isinstance(v.tokens, StreamedTokens) for v in data.videos)
    assert source.reads == 0 and source.kept_bytes == 0  # only metadata was read
    with h5py.File(cache) as f:
        for v in data.videos:
            assert v.length == len(f["videos"][v.key]["shots"])
            got = v.read()
            for ft in ("resnet18", "r2plus1d"):
                assert np.array_equal(got[ft], f["videos"][v.key][ft][()])
    assert source.reads == len(data.videos)
    data.videos[0].read()
    assert source.reads == len(data.videos)  # the second read came from memory


def test_token_cache_keeps_to_its_budget_least_recently_used_first(small):
    cache, labels, _ = small
    lab = load_labels(labels)
    data = load_cache(cache, lab, ("vit",), "frame", log=quiet, cache_bytes=0)
    sizes = [sum(x.nbytes for x in v.read().values()) for v in data.videos]
    src = data.videos[0].tokens.source
    assert src.kept_bytes == 0 and src.reads == len(data.videos)  # budget 0: nothing kept
    budget = sizes[0] + sizes[1] + sizes[2]
    src = TokenSource(cache, ("vit",), "frame", {}, None, cache_bytes=budget)
    for v in data.videos[:3]:
        src.read(v.key)
    assert src.kept_bytes == budget and src.reads == 3
    src.read(data.videos[3].key)  # evicts video 0 (and 1, if needed to fit)
    assert src.kept_bytes <= budget
    src.read(data.videos[2].key)
    assert src.reads == 4  # video 2 was still in memory
    src.read(data.videos[0].key)
    assert src.reads == 5  # video 0 was evicted first


def test_alignment_errors_are_found_from_metadata_before_training(small, tmp_path):
    cache, labels, _ = small
    broken = tmp_path / "broken.h5"
    compact_cache(cache, broken, progress=False)  # a one-file copy to edit by hand
    with h5py.File(broken, "a") as f:
        g = next(iter(f["videos"].values()))
        x, attrs = g["resnet18"][()], dict(g["resnet18"].attrs)
        del g["resnet18"]
        g.create_dataset("resnet18", data=x[:-1])  # one row short of 'shots'
        g["resnet18"].attrs.update(attrs)
    from vtx.train.dataset import CacheDataError

    with pytest.raises(CacheDataError, match="shot features must align on 'shots'"):
        load_cache(broken, load_labels(labels), ("resnet18",), "shot", log=quiet)


def test_loader_workers_train_exactly_like_the_training_process(small, tmp_path):
    cache, labels, _ = small
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        train_head(config(cache, labels, out, epochs=2, loader_workers=workers, cache_mb=0),
                   log=quiet)
        runs[workers] = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs[0], runs[2]):
        a.pop("seconds"), b.pop("seconds")
        assert a == b
