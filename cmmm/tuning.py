"""Choosing options on validation only: ``cmmm tune``.

A tuning study is an experiment (``cmmm.experiments``): candidate configurations x seeds, each
run recording AA/FM on the tasks' validation splits (``results.json["valid"]``) next to test.
``cmmm tune`` ranks the candidates by mean validation AA and names the first as chosen; the
paired difference of validation AA to the chosen row (over the seeds both finished) says whether
the choice is clear or within noise. Test AA/FM are printed for the record, after the choice and
never used to make it: ``rank_on_validation`` reads nothing else.

Candidates come from a TOML experiment file or from flags: ``--grid lr=1e-3,1e-2 --grid
trainable_head=none,pattern`` crosses the values; a name that is a run setting (``lr``,
``epochs``, ``pretrain_epochs``, ...) varies the run, any other name is an option of the strategy.
"""

from __future__ import annotations

import json
import shlex
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cmmm.atomic_files import atomic_write_text
from cmmm.errors import ConfigError
from cmmm.experiments import HEADROOM_STRATEGIES, Experiment, collect_outcomes, experiment_from_spec
from cmmm.outcomes import RunOutcome
from cmmm.run_config import RunConfig
from cmmm.significance import Interval, difference_cell, paired_difference
from cmmm.summary import SeedStatistics, only_seeds

# A study's default: three seeds, enough to see a clear winner; claims still need five.
DEFAULT_TUNE_SEEDS = [0, 1, 2]
# Run settings a grid may vary directly (the rest of RunConfig is fixed by flags).
_RUN_SETTINGS = {f.name for f in fields(RunConfig)} - {
    "strategy_options",
    "stream_options",
    "backbone_options",
    "seed",
    "out",
    "data_dir",
    "cache_dir",
}


def _value(text: str) -> Any:
    """A grid value as TOML would read it: numbers, true/false, lists; else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _split_values(text: str) -> list[str]:
    """Split at commas outside brackets, so list values stay whole: ``[0,1],[2]``."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [part.strip() for part in [*parts, current] if part.strip()]


def parse_grid(flags: Sequence[str]) -> dict[str, list[Any]]:
    """``["lr=1e-3,1e-2", "trainable_head=none,out"]`` -> an experiment ``[grid]`` table."""
    grid: dict[str, list[Any]] = {}
    for flag in flags:
        name, sep, values = flag.partition("=")
        name = name.strip()
        if not sep or not name or not values.strip():
            raise ConfigError(f"--grid {flag!r}: write NAME=V1,V2,..., e.g. --grid lr=1e-3,1e-2")
        key = name if name in _RUN_SETTINGS else f"strategy_options.{name}"
        if key in grid:
            raise ConfigError(f"--grid names {name!r} twice; list all its values once")
        grid[key] = [_value(v) for v in _split_values(values)]
    if not grid:
        raise ConfigError("cmmm tune needs a FILE or at least one --grid NAME=V1,V2")
    return grid


def experiment_from_flags(
    stream: str,
    strategy: str,
    grid: dict[str, list[Any]],
    seeds: Sequence[int],
    base: dict[str, Any],
    out: Path,
) -> Experiment:
    """The study of ``grid`` over ``strategy`` on ``stream`` as an experiment (its tables are
    named ``tune-<stream>-<strategy>``)."""
    spec = {
        "title": f"Tuning {strategy} on {stream} (chosen on validation)",
        "seeds": list(seeds),
        "headroom": False,
        "base": {**base, "stream": stream, "strategy": strategy},
        "grid": grid,
    }
    return experiment_from_spec(spec, Path(out) / f"tune-{stream}-{strategy}.toml")


@dataclass(frozen=True)
class Candidate:
    """One configuration's finished seeds, as the ranking sees them."""

    label: str
    config: RunConfig
    stats: SeedStatistics

    def valid_difference(self, chosen: Candidate) -> tuple[Interval, list[int]] | None:
        """This candidate's validation AA minus the chosen one's, paired over the seeds both
        ran from the same pre-trained backbone."""
        seeds = self.stats.pairable_seeds(chosen.stats)
        return paired_difference(
            only_seeds(self.stats.valid_aa_by_seed, seeds), chosen.stats.valid_aa_by_seed
        )


def rank_on_validation(
    experiment: Experiment, outcomes: dict[str, list[RunOutcome]]
) -> dict[str, list[Candidate]]:
    """Per strategy (in the order the rows name them), its candidates best mean validation AA
    first (ties: smaller trainable share first), those without validation results last; headroom
    rows (zeroshot, joint) are not candidates. Reads validation numbers only: test AA cannot
    change the order."""
    ranked: dict[str, list[Candidate]] = {}
    for row in experiment.rows:
        if row.config.strategy in HEADROOM_STRATEGIES:
            continue
        results = [o.result for o in outcomes[row.label] if o.result is not None]
        ranked.setdefault(row.config.strategy, []).append(
            Candidate(row.label, row.config, SeedStatistics.of(results))
        )

    def key(candidate: Candidate) -> tuple[int, float, float]:
        aa = candidate.stats.valid_aa
        share = candidate.stats.trainable_share
        return (0 if aa else 1, -statistics.mean(aa) if aa else 0.0, share or 0.0)

    return {strategy: sorted(found, key=key) for strategy, found in ranked.items()}


def chosen_of(candidates: list[Candidate]) -> Candidate | None:
    """The first-ranked candidate, when it has validation results."""
    return candidates[0] if candidates and candidates[0].stats.valid_aa else None


def chosen_settings(candidate: Candidate) -> dict[str, Any]:
    """What differs from the defaults in the chosen configuration: run settings and options."""
    defaults = RunConfig()
    settings = {
        name: getattr(candidate.config, name)
        for name in sorted(_RUN_SETTINGS)
        if name not in ("stream", "strategy")
        and getattr(candidate.config, name) != getattr(defaults, name)
    }
    return {
        "stream": candidate.config.stream,
        "strategy": candidate.config.strategy,
        **settings,
        "strategy_options": dict(candidate.config.strategy_options),
    }


def run_command(settings: dict[str, Any]) -> str:
    """The ``cmmm run`` command line of ``chosen_settings``."""
    parts = ["cmmm", "run", "--stream", settings["stream"], "--strategy", settings["strategy"]]
    for name, value in settings.items():
        if name in ("stream", "strategy", "strategy_options") or value is None:
            continue
        parts += [f"--{name.replace('_', '-')}", str(value)]
    for name, value in settings["strategy_options"].items():
        text = value if isinstance(value, str) else json.dumps(value)
        parts += ["--option", f"{name}={text}"]
    return " ".join(shlex.quote(part) for part in parts)


def tune_table(
    experiment: Experiment,
    ranked: dict[str, list[Candidate]],
    command: str,
    missing: int = 0,
) -> str:
    """The study as Markdown: per strategy, rank, validation AA/FM, paired validation difference
    to that strategy's chosen row, then test AA/FM for the record, trainable share and seeds."""
    header = [
        "rank",
        "configuration",
        "AA valid (%)",
        "FM valid",
        "AA valid − chosen (paired)",
        "AA test (%)",
        "FM test",
        "trainable (% of backbone)",
        "seeds",
    ]
    lines = [
        f"### {experiment.title}",
        "",
        f"Ranked per strategy by mean validation AA over seeds {experiment.seeds}; mean ± "
        "half-width of the 95 % interval (Student t). Test columns are reported after the "
        f"choice and choose nothing. Produced by `{command}`.",
        "",
        "| " + " | ".join(header) + " |",
        "|---:|---" + "|---:" * (len(header) - 2) + "|",
    ]
    verdicts: list[str] = []
    for strategy, candidates in ranked.items():
        chosen = chosen_of(candidates)
        for rank, candidate in enumerate(candidates, start=1):
            difference = "n/a"
            if candidate is chosen:
                difference = "chosen"
            elif chosen is not None:
                difference = difference_cell(candidate.valid_difference(chosen))
            stats = candidate.stats
            share = stats.trainable_share
            cells = [
                f"{strategy} {rank}" if stats.valid_aa else "-",
                candidate.label,
                stats.cell("valid_aa"),
                stats.cell("valid_fm"),
                difference,
                stats.cell("aa"),
                stats.cell("fm"),
                "-" if share is None else f"{100 * share:.2f}",
                str(len(stats.seeds)),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        if chosen is None:
            verdicts.append(f"- {strategy}: no finished run with validation results yet.")
            continue
        close = [
            c.label
            for c in candidates[1:]
            if (d := c.valid_difference(chosen)) is not None and not d[0].excludes_zero
        ]
        command_line = run_command(chosen_settings(chosen))
        verdicts.append(
            f"- {strategy}: chosen on validation **{chosen.label}** (`{command_line}`)"
            + (
                "; not separated from it on validation (paired interval includes 0): "
                + "; ".join(close)
                if close
                else ""
            )
            + "."
        )
    lines += ["", *verdicts]
    if missing:
        lines += ["", f"{missing} runs not finished yet (not run: --finished-only)."]
    return "\n".join(lines) + "\n"


def tune(
    experiment: Experiment,
    out: Path,
    command: str,
    log: Callable[[str], None] = print,
    finished_only: bool = False,
) -> tuple[str, dict[str, Any] | None]:
    """Run (or reuse) every candidate and seed, rank on validation, write ``OUT/<name>.md`` and
    ``OUT/<name>.chosen.json``; return the table and, per strategy, the chosen settings."""
    outcomes = collect_outcomes(experiment, log, run_missing=not finished_only)
    missing = sum(o.status == "missing" for found in outcomes.values() for o in found)
    ranked = rank_on_validation(experiment, outcomes)
    table = tune_table(experiment, ranked, command, missing)
    stem = experiment.source.stem
    atomic_write_text(Path(out) / f"{stem}.md", table)
    chosen: dict[str, Any] = {}
    for strategy, candidates in ranked.items():
        best = chosen_of(candidates)
        if best is not None:
            chosen[strategy] = {
                "label": best.label,
                "valid_aa": best.stats.mean("valid_aa"),
                "seeds": sorted(best.stats.valid_aa_by_seed),
                "settings": chosen_settings(best),
                "command": run_command(chosen_settings(best)),
            }
    if chosen:
        atomic_write_text(Path(out) / f"{stem}.chosen.json", json.dumps(chosen, indent=2) + "\n")
    return table, chosen or None
