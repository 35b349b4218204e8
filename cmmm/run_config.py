"""A run's settings: ``RunConfig``, its defaults and its key.

``RunConfig`` holds every setting of one run; ``complete`` fills what is unset from the stream's
defaults, then the paper's (``PAPER_DEFAULTS``); ``RunConfig.key`` hashes what changes a run's
result, which names its directory and lets finished runs be reused. The environment's defaults
of the data and cache directories are read here, and only here. ``cmmm.config.resolve``, the
one path from settings to a run, builds on this module.

This module imports no heavy library at import time: the command line's help reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cmmm.config_checks import check_missing_rate, check_run_settings
from cmmm.errors import ConfigError

# RunConfig fields that say where and how a run is computed, not what it computes
# (RunConfig.key() ignores them too): they may change between sessions.
LOCATION_FIELDS = ("out", "data_dir", "cache_dir", "device", "threads", "eval_batch_size")
# Run settings added after results existed, with the value every earlier run had: an older
# results.json lacks them, and the run key leaves them out at these values so that finished runs
# keep their keys (and are reused) across versions.
ADDED_SETTINGS: dict[str, Any] = {
    "eval_patterns": "",
    "missing_rate": 1.0,
    "missing_mode": "pattern",
}

DATA_DIR_ENV = "CMMM_DATA_DIR"
CACHE_DIR_ENV = "CMMM_CACHE_DIR"


def default_data_dir() -> str:
    """The data directory when none is given: ``$CMMM_DATA_DIR``, else ``./data``."""
    return os.environ.get(DATA_DIR_ENV, "data")


def default_cache_dir() -> str:
    """The cache directory when none is given: ``$CMMM_CACHE_DIR``, else ``./.cache``."""
    return os.environ.get(CACHE_DIR_ENV, ".cache")


# method.md's training protocol: Adam, batch 64, 30 epochs per task.
PAPER_DEFAULTS = {"epochs": 30, "pretrain_epochs": 30}


def changed_options(strategy: str) -> dict[str, tuple[Any, Any]]:
    """Options of ``strategy`` whose default changed after runs were stored: name -> (old
    default, new default), registered as ``STRATEGIES.register(..., changed_options={...})``.

    ``resolved`` writes the new default into a config that does not set the option, so the run
    key records it and a stored run made under the old default is never reused as a run of the
    new one; ``key`` hashes the old default as absent, so stored runs keep their keys and are
    reused by configs that ask for the old value explicitly."""
    from cmmm.strategy import STRATEGIES

    if strategy not in STRATEGIES:
        return {}  # an unknown name fails with its one-line error where the strategy is built
    return dict(STRATEGIES.get(strategy).defaults.get("changed_options", {}))


def options_at_default(
    strategy: str, options: Mapping[str, Any], keep: Collection[str] = ()
) -> set[str]:
    """The names in ``options`` (other than ``keep``) that change nothing: the strategy built
    without them records the same options in effect (``Strategy.options``) as with them, so a
    run that writes an option at the value it takes anyway is the run that leaves it out.

    Conservative: an option the strategy does not record, a strategy that is not registered or
    options that do not build (their one-line error comes where the strategy is built) count as
    changing the run."""
    from cmmm.strategy import STRATEGIES

    if not options or strategy not in STRATEGIES:
        return set()
    factory = STRATEGIES.get(strategy).factory

    def recorded(chosen: Mapping[str, Any]) -> dict[str, Any] | None:
        try:
            return factory(**chosen).options()
        except (ConfigError, TypeError):
            return None

    everything = recorded(options)
    if not everything:
        return set()
    redundant = {
        name
        for name in options
        if name not in keep
        and name in everything
        and recorded({k: v for k, v in options.items() if k != name}) == everything
    }
    # Each alone changes nothing; dropped together they must not either (coupled options).
    if (
        redundant
        and recorded({k: v for k, v in options.items() if k not in redundant}) != everything
    ):
        return set()
    return redundant


@dataclass
class RunConfig:
    stream: str = "synthetic"
    strategy: str = "naive"
    # None: the stream's recommended value (the paper's 30 for real data, fewer for synthetic).
    epochs: int | None = None
    batch_size: int = 64
    # Evaluation takes a whole test set in a few large batches (MOSI's 752 samples in one); it
    # changes memory use, not results.
    eval_batch_size: int = 1024
    lr: float = 1e-3
    seed: int = 0
    task_order: str = "default"
    task_data: str = "full"
    pretrain_epochs: int | None = None
    data_dir: str = field(default_factory=default_data_dir)
    out: str = "runs"
    # Built datasets and pre-trained backbones; never inside the data directory, which may be
    # shared and read-only.
    cache_dir: str = field(default_factory=default_cache_dir)
    device: str = "auto"
    # Intra-op threads of this run. One by default: on a small shared machine two threads made
    # a step of these tiny matrices up to 80x slower; run two runs side by side instead.
    threads: int = 1
    strategy_options: dict[str, Any] = field(default_factory=dict)
    # Per-feature z-scoring with train statistics (see cmmm.data.standardization).
    standardize: bool = True
    # Passed to the stream's loader (e.g. the synthetic generator's sizes, MOSI's valid videos).
    stream_options: dict[str, Any] = field(default_factory=dict)
    # Overrides of MulTConfig (layers, d_model, dropouts, ...); the paper's MulT when empty.
    backbone_options: dict[str, Any] = field(default_factory=dict)
    # Missing cases tested but never trained on: "unseen", or patterns as for task_order.
    eval_patterns: str = ""
    # Share of a task's samples that follow its pattern (1: all; the seeds' 0.7, 0.9), and how
    # a multi-modality pattern is applied below 1 (cmmm.data.missing_stream).
    missing_rate: float = 1.0
    missing_mode: str = "pattern"

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str) -> RunConfig:
        """A config from plain values (a TOML table, results.json's ``config``); ``where`` names
        their source in the error about an unknown key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown settings {unknown}; valid: {sorted(known)}")
        config = cls(**values)
        try:
            check_run_settings(config)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        return config

    def resolved(self) -> RunConfig:
        """A copy with every unset value filled from the stream's defaults (then the paper's):
        ``complete``. Code that runs or plans runs calls ``cmmm.config.resolve``,
        which also builds the strategy; this is the configuration half, for a quick look."""
        return complete(self)

    def validate(self) -> RunConfig:
        check_run_settings(self)  # types and upper bounds first, so the checks below can compare
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if value is None or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.pretrain_epochs is None or self.pretrain_epochs < 0:
            raise ConfigError(f"--pretrain-epochs must be >= 0, got {self.pretrain_epochs}")
        if not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if not 1 <= self.threads <= 256:
            raise ConfigError(f"--threads must be between 1 and 256, got {self.threads}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")
        check_missing_rate(self.missing_rate, self.missing_mode)
        return self

    def key(self) -> str:
        """Short hash of everything that changes the result (not where it is written)."""
        material = {
            k: v
            for k, v in asdict(self).items()
            if k not in LOCATION_FIELDS and not (k in ADDED_SETTINGS and v == ADDED_SETTINGS[k])
        }
        # The evaluation batch size changes memory use, not results. Keys were defined when
        # every run evaluated in batches of 256: it is hashed as 256, so earlier runs keep theirs.
        material["eval_batch_size"] = 256
        # An option at the default it had before it changed is what a stored run without it
        # meant: hashed as absent, so those runs keep their keys (see changed_options).
        changed = changed_options(self.strategy)
        options = {
            k: v
            for k, v in self.strategy_options.items()
            if not (k in changed and v == changed[k][0])
        }
        # An option written at the value it takes anyway is the run without it: hashed as
        # absent, so "-o prompt_length=16" reuses the default run. Changed options are kept:
        # their new default is written on purpose (above) to tell them from stored runs.
        at_default = options_at_default(self.strategy, options, keep=changed)
        material["strategy_options"] = {k: v for k, v in options.items() if k not in at_default}
        return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:10]

    def run_dir(self) -> Path:
        return Path(self.out) / f"{self.stream}-{self.strategy}-seed{self.seed}-{self.key()}"


def complete(config: RunConfig) -> RunConfig:
    """A copy of ``config`` with every unset value filled from the stream's defaults (then the
    paper's), and the new defaults of the strategy's changed options under the options given
    (``changed_options``), checked: the configuration half of ``resolve``."""
    from cmmm.data.catalog import STREAMS

    defaults = {**PAPER_DEFAULTS, **STREAMS.get(config.stream).defaults}
    filled = {
        k: defaults[k] if v is None and k in defaults else v for k, v in asdict(config).items()
    }
    new_defaults = {name: new for name, (_, new) in changed_options(config.strategy).items()}
    filled["strategy_options"] = {**new_defaults, **config.strategy_options}
    return RunConfig(**filled).validate()
