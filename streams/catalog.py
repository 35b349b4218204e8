"""The streams ``cmmm run --stream`` knows, by name.

A loader takes the data directory, a cache directory it may write to and a logging function,
and returns a validated ``MultimodalDataset``; ``streams.missing_stream`` builds the
missing-case stream from it.
Adding a dataset: write its loader in its own file and register it here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cmmm.registry import Registry
from streams.base import MultimodalDataset

Loader = Callable[[Path, Path, Callable[[str], None]], MultimodalDataset]
STREAMS: Registry[Loader] = Registry("stream")


# The synthetic streams default to fewer epochs than the paper's 30 so that the default
# `cmmm run` finishes in about a minute on two CPU cores; --epochs overrides it.
SYNTHETIC_DEFAULTS = {"epochs": 5, "pretrain_epochs": 10}


@STREAMS.register(
    "synthetic", "embedded seeded regression stream (MOSI-like, no download)", **SYNTHETIC_DEFAULTS
)
def _synthetic(data_dir: Path, cache_dir: Path, log: Callable[[str], None]) -> MultimodalDataset:
    from streams.synthetic import SyntheticSpec, make_synthetic

    return make_synthetic(SyntheticSpec(task_type="regression"))


@STREAMS.register(
    "synthetic-cls",
    "embedded seeded 4-class stream (IEMOCAP-like, no download)",
    **SYNTHETIC_DEFAULTS,
)
def _synthetic_cls(
    data_dir: Path, cache_dir: Path, log: Callable[[str], None]
) -> MultimodalDataset:
    from streams.synthetic import SyntheticSpec, make_synthetic

    return make_synthetic(SyntheticSpec(task_type="classification"))


@STREAMS.register("mosi", "real CMU-MOSI utterance features (bc-LSTM CSVs + CMU SDK labels)")
def _mosi(data_dir: Path, cache_dir: Path, log: Callable[[str], None]) -> MultimodalDataset:
    from streams.mosi import load_mosi

    return load_mosi(data_dir, cache_dir=cache_dir / "mosi", log=log)


@STREAMS.register("mosi-pkl", "CMU-MOSI from a MulT or MMSA pickle in <data-dir>/mosi/")
def _mosi_pickle(data_dir: Path, cache_dir: Path, log: Callable[[str], None]) -> MultimodalDataset:
    from streams.pickles import load_pickle_stream

    return load_pickle_stream("mosi-pkl", data_dir, log=log)


@STREAMS.register("iemocap", "IEMOCAP, 4 emotions, from MulT's iemocap_data.pkl")
def _iemocap(data_dir: Path, cache_dir: Path, log: Callable[[str], None]) -> MultimodalDataset:
    from streams.pickles import load_pickle_stream

    return load_pickle_stream("iemocap", data_dir, log=log)


@STREAMS.register("sims", "CH-SIMS from MMSA's unaligned_39.pkl")
def _sims(data_dir: Path, cache_dir: Path, log: Callable[[str], None]) -> MultimodalDataset:
    from streams.pickles import load_pickle_stream

    return load_pickle_stream("sims", data_dir, log=log)
