"""Types and upper bounds of a run's settings, checked before anything is allocated.

A setting can come from a flag, a TOML file, a results.json or a sweep: each is checked here for
its type (a mistyped ``epochs = "ten"`` is a one-line error, not a ``TypeError`` deep inside) and
for an upper bound that says why it exists. Without bounds, ``--lr 1e30`` trained on NaN losses
and printed a normal-looking AA, and a huge batch or prompt length crashed the process while
allocating.
"""

from __future__ import annotations

import math
from typing import Any

from cmmm.errors import ConfigError

# Epochs beyond this are a typo (the paper trains 30): a run would take weeks.
MAX_EPOCHS = 10_000
# Larger batches do not fit in memory with the backbone's attention on any machine we target.
MAX_BATCH_SIZE = 65_536
# Adam diverges far below this; a larger rate is a typo (1e3 for 1e-3).
MAX_LR = 10.0
# numpy's and torch's generators take seeds in 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1
# Sizes in backbone options (layers, widths, heads): the attention's memory grows with their
# square; and in stream options (samples, lengths of the synthetic stream).
MAX_BACKBONE_SIZE = 4096
MAX_STREAM_SIZE = 10_000_000
# How a task's pattern is applied below a missing rate of 1 (cmmm.data.missing_stream).
MISSING_MODES: tuple[str, ...] = ("pattern", "split")

_STRING_FIELDS = (
    "stream",
    "strategy",
    "task_order",
    "task_data",
    "data_dir",
    "out",
    "cache_dir",
    "device",
    "eval_patterns",
    "missing_mode",
)
_MAPPING_FIELDS = ("strategy_options", "stream_options", "backbone_options")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_run_settings(config: Any) -> None:
    """Raise ``ConfigError`` for the first setting of ``config`` (a ``RunConfig``) of the wrong
    type or beyond its bound; the message names the setting and the reason."""
    for name in _STRING_FIELDS:
        value = getattr(config, name)
        if not isinstance(value, str):
            raise ConfigError(f"{_flag(name)} must be text, got {value!r}")
    for name in _MAPPING_FIELDS:
        value = getattr(config, name)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{name} must be a table of named options, got {value!r}")
    if not isinstance(config.standardize, bool):
        raise ConfigError(f"--standardize must be true or false, got {config.standardize!r}")
    for name, bound in (
        ("epochs", MAX_EPOCHS),
        ("pretrain_epochs", MAX_EPOCHS),
        ("batch_size", MAX_BATCH_SIZE),
        ("eval_batch_size", MAX_BATCH_SIZE),
    ):
        value = getattr(config, name)
        if value is None:
            continue
        if not _is_int(value):
            raise ConfigError(f"{_flag(name)} must be a whole number, got {value!r}")
        if value > bound:
            raise ConfigError(
                f"{_flag(name)} must be <= {bound}, got {value}: "
                + (
                    "a run that long is a typo"
                    if "epochs" in name
                    else "it would not fit in memory"
                )
            )
    for name in ("lr", "missing_rate"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{_flag(name)} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{_flag(name)} must be finite, got {value}")
    if config.lr > MAX_LR:
        raise ConfigError(
            f"--lr must be <= {MAX_LR:g}, got {config.lr:g}: training diverges to NaN long before"
        )
    if not _is_int(config.seed) or not 0 <= config.seed <= MAX_SEED:
        raise ConfigError(
            f"--seed must be a whole number from 0 to {MAX_SEED} (what the random generators "
            f"take), got {config.seed!r}"
        )
    _check_sizes("backbone option", config.backbone_options, MAX_BACKBONE_SIZE)
    _check_sizes("stream option", config.stream_options, MAX_STREAM_SIZE)


def _check_sizes(what: str, options: dict[str, Any], bound: int) -> None:
    for name, value in options.items():
        values = value if isinstance(value, list | tuple) else [value]
        for item in values:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{what} {name} must be finite, got {item}")
            if _is_int(item) and abs(item) > bound:
                raise ConfigError(
                    f"{what} {name} must be at most {bound}, got {item}: it would not fit in memory"
                )


def check_missing_rate(rate: float, mode: str) -> None:
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(
            f"--missing-rate must lie in [0, 1] (the share of a task's samples that follow its "
            f"pattern; 0.7 for the seeds' 70 % setting), got {rate}"
        )
    if mode not in MISSING_MODES:
        raise ConfigError(f"--missing-mode must be one of {', '.join(MISSING_MODES)}, got {mode!r}")
