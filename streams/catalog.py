"""The built-in streams, registered in ``cmmm.data.catalog.STREAMS`` by name.

Each loader lives in its own file and is imported only when its stream is built; adding a
dataset: write its loader in its own file and register it here (or in that file).
"""

from __future__ import annotations

import dataclasses

from cmmm.data.catalog import STREAMS, StreamRequest
from cmmm.data.dataset import MultimodalDataset

# The synthetic streams default to fewer epochs than the paper's 30 so that the default
# `cmmm run` finishes in about a minute on two CPU cores; --epochs overrides it.
SYNTHETIC_DEFAULTS = {"epochs": 5, "pretrain_epochs": 10}


def _synthetic_options(task_type: str) -> dict[str, str]:
    """The options a synthetic stream of this task type accepts, with their defaults."""
    from streams.synthetic import SyntheticSpec

    # A regression stream has no classes: listing num_classes there would invite a no-op option.
    fixed = {"task_type"} if task_type == "classification" else {"task_type", "num_classes"}
    return {
        f.name: f"default {f.default!r}"
        for f in dataclasses.fields(SyntheticSpec)
        if f.name not in fixed
    }


def _synthetic_spec(request: StreamRequest, task_type: str):
    from streams.synthetic import SyntheticSpec

    options = request.take_options(set(_synthetic_options(task_type)))
    for key in ("modalities", "seq_lens", "feature_dims", "signal"):
        if key in options:
            options[key] = tuple(options[key])
    return SyntheticSpec(task_type=task_type, **options)


@STREAMS.register(
    "synthetic",
    "embedded seeded regression stream (MOSI-like, no download)",
    options=_synthetic_options("regression"),
    **SYNTHETIC_DEFAULTS,
)
def _synthetic(request: StreamRequest) -> MultimodalDataset:
    from streams.synthetic import make_synthetic

    return make_synthetic(_synthetic_spec(request, "regression"))


@STREAMS.register(
    "synthetic-cls",
    "embedded seeded 4-class stream (IEMOCAP-like, no download)",
    options=_synthetic_options("classification"),
    **SYNTHETIC_DEFAULTS,
)
def _synthetic_cls(request: StreamRequest) -> MultimodalDataset:
    from streams.synthetic import make_synthetic

    return make_synthetic(_synthetic_spec(request, "classification"))


@STREAMS.register(
    "mosi",
    "real CMU-MOSI utterance features (bc-LSTM CSVs + CMU SDK labels)",
    options={
        "valid_videos": "default 10: whole train videos held out for validation",
        "split_seed": "default 0: which videos are held out",
        "text": "default 'utterance' (bc-LSTM 100-d vectors) or a `cmmm data encode-text` name "
        "such as 'minilm' (token sequences); also `--text`",
    },
)
def _mosi(request: StreamRequest) -> MultimodalDataset:
    from streams.mosi import load_mosi

    options = request.take_options({"valid_videos", "split_seed", "text"})
    return load_mosi(
        request.data_dir, cache_dir=request.cache_dir / "mosi", log=request.log, **options
    )


@STREAMS.register(
    "mfeat",
    "real UCI Multiple Features: handwritten digits, 10 classes, views as modalities",
    options={
        "views": "default 'fou,zer,mor': any of fou,fac,kar,pix,zer,mor in the order given "
        "(2^M - 1 tasks)",
    },
)
def _mfeat(request: StreamRequest) -> MultimodalDataset:
    from streams.mfeat import DEFAULT_VIEWS, load_mfeat

    options = request.take_options({"views"})
    return load_mfeat(request.data_dir, views=options.get("views", DEFAULT_VIEWS), log=request.log)


def _pickle_stream(name: str, request: StreamRequest) -> MultimodalDataset:
    from streams.pickles import load_pickle_stream

    request.take_options(set())
    return load_pickle_stream(
        name, request.data_dir, log=request.log, cache_dir=request.cache_dir / "pickles"
    )


@STREAMS.register("mosi-pkl", "CMU-MOSI from a MulT or MMSA pickle in <data-dir>/mosi/")
def _mosi_pickle(request: StreamRequest) -> MultimodalDataset:
    return _pickle_stream("mosi-pkl", request)


@STREAMS.register("iemocap", "IEMOCAP, 4 emotions, from MulT's iemocap_data.pkl")
def _iemocap(request: StreamRequest) -> MultimodalDataset:
    return _pickle_stream("iemocap", request)


@STREAMS.register("sims", "CH-SIMS from MMSA's unaligned_39.pkl")
def _sims(request: StreamRequest) -> MultimodalDataset:
    return _pickle_stream("sims", request)
