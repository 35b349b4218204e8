"""Figures of finished runs: forgetting curves, the accuracy matrix, and a strategy comparison.

Everything here reads ``results.json`` files (see ``cmmm.running``) and draws with matplotlib's
object API (``matplotlib.figure.Figure``, no pyplot state), so it works headless and in tests.

- ``forgetting_curves``: accuracy on every task after every training step, one line per task,
  solid from the step the task is trained on, dotted (faded) before it. Several seeds of one
  strategy: the seed mean, with a min-max band. Several strategies: one panel each plus an
  "AA so far" panel (mean ± std over seeds; joint training as a horizontal reference line).
- ``accuracy_heatmap``: the accuracy matrix (seed mean) with the values in the cells.
- ``strategy_comparison``: AA and FM per strategy, mean ± 95 % confidence interval over seeds
  (Student t, ``cmmm.significance``), seeds as dots.

Every plotting function returns the ``Figure``; the drawn lines carry a ``gid`` ("<strategy
label>|<task name>", "aa_so_far|<strategy label>") so callers and tests can find their data.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from cmmm.errors import ConfigError, DataError
from cmmm.results import Results, find_results

Kind = Literal["curves", "heatmap", "compare", "all"]
# The two scores a comparison figure shows per group.
Metric = Literal["aa", "fm"]
KINDS: tuple[str, ...] = ("curves", "heatmap", "compare", "all")
SUFFIXES: tuple[str, ...] = (".png", ".svg")
DPI = 110
PALETTE_ABOVE_BYTES = 200_000

# How the streams `cmmm run --stream` knows are named in titles; others fall back to `source`.
STREAM_LABELS = {
    "mosi": "CMU-MOSI (real, bc-LSTM features)",
    "mosi-pkl": "CMU-MOSI (real, pickled MulT/MMSA features)",
    "iemocap": "IEMOCAP (real, 4 emotions)",
    "sims": "CH-SIMS (real)",
    "synthetic": "synthetic regression stream (not real data)",
    "synthetic-cls": "synthetic 4-class stream (not real data)",
}
METRIC_LABELS = {
    "mosi": "binary accuracy on non-zero labels (Acc-2)",
    "sims": "binary accuracy, label 0 counted negative (Acc-2)",
    "classification": "multiclass accuracy",
}
# Config keys that never change what a run computes; the rest (minus the seed) define a group.
_NOT_SETTINGS = {"seed", "out", "data_dir", "cache_dir", "device", "eval_batch_size", "threads"}
_STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "figure.titlesize": 13,
}


# --------------------------------------------------------------------------------------------
# Grouping runs
# --------------------------------------------------------------------------------------------


def settings_of(run: Results) -> dict[str, Any]:
    """The configuration that defines a group: everything but the seed and where things live."""
    return {k: v for k, v in run.config.items() if k not in _NOT_SETTINGS}


@dataclass(frozen=True)
class RunGroup:
    """Runs of one strategy with identical settings, differing only in the seed."""

    label: str
    runs: list[Results]

    @property
    def strategy(self) -> str:
        return self.runs[0].strategy.name

    @property
    def joint(self) -> bool:
        return self.runs[0].joint

    @property
    def seeds(self) -> list[int]:
        return [run.seed for run in self.runs]

    def missing_note(self) -> str:
        """What a panel says for a metric the group has no value of: FM of a one-row matrix
        (joint training, or the zero-shot reference, which trains nothing) is undefined."""
        if not self.joint:
            return "n/a"
        return "n/a (joint)" if self.runs[0].strategy.trained else "n/a (not trained)"

    @property
    def matrices(self) -> np.ndarray:
        """(seeds, steps, tasks)."""
        return np.stack([run.matrix_array() for run in self.runs])

    def mean_matrix(self) -> np.ndarray:
        """The seed mean of the accuracy matrix; NaN only where every seed is NaN."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(self.matrices, axis=0)

    def describe_seeds(self) -> str:
        n = len(self.runs)
        if n == 1:
            return f"seed {self.seeds[0]}"
        return f"mean of {n} seeds ({', '.join(map(str, self.seeds))})"


def group_runs(runs: Sequence[Results], strategies: Sequence[str] | None = None) -> list[RunGroup]:
    """Group runs by strategy and settings (all but the seed), in the order strategies appear.

    All runs must come from the same stream with the same task order, so that one figure compares
    like with like. ``strategies`` keeps only those strategy names, in that order; without it,
    groups come in the order of the runs, joint training last.
    """
    if strategies:
        known = sorted({run.strategy.name for run in runs})
        unknown = [s for s in strategies if s not in known]
        if unknown:
            raise ConfigError(
                f"--strategy {','.join(unknown)}: no such runs; the runs given are of "
                f"{', '.join(known)}"
            )
        runs = [run for run in runs if run.strategy.name in strategies]
    streams = sorted({str(run.config["stream"]) for run in runs})
    if len(streams) > 1:
        raise DataError(
            f"the runs come from several streams ({', '.join(streams)}); plot each separately"
        )
    orders = {tuple(run.task_names) for run in runs}
    if len(orders) > 1:
        raise DataError(
            "the runs use different task orders; plot each order separately "
            f"({'; '.join(' > '.join(order) for order in sorted(orders))})"
        )
    buckets: dict[str, list[Results]] = {}
    for run in runs:
        key = json.dumps([run.strategy.name, settings_of(run)], sort_keys=True, default=str)
        buckets.setdefault(key, []).append(run)
    members = [sorted(group, key=lambda r: (r.seed, str(r.path))) for group in buckets.values()]
    for group in members:
        seeds = [run.seed for run in group]
        duplicated = sorted({s for s in seeds if seeds.count(s) > 1})
        if duplicated:
            raise DataError(
                f"{group[0].strategy.name}: several runs with the same settings and seed "
                f"{duplicated} ({', '.join(str(r.path) for r in group if r.seed in duplicated)}); "
                "give only one of them"
            )
    if strategies:  # in the order asked for
        members.sort(key=lambda group: list(strategies).index(group[0].strategy.name))
    else:  # joint training last: the reference the sequential strategies are read against
        members.sort(key=lambda group: group[0].joint)
    return [RunGroup(_label(group, members), group) for group in members]


def _label(group: list[Results], groups: list[list[Results]]) -> str:
    """The strategy name, plus the settings that tell it apart from same-named groups."""
    name = group[0].strategy.name
    rivals = [g for g in groups if g[0].strategy.name == name]
    if len(rivals) == 1:
        return name
    mine = settings_of(group[0])
    differing = sorted(
        {k for g in rivals for k, v in settings_of(g[0]).items() if mine.get(k) != v}
        | {k for k in mine if any(k not in settings_of(g[0]) for g in rivals)}
    )
    shown = ", ".join(f"{k}={json.dumps(mine.get(k), default=str)}" for k in differing)
    return f"{name} [{shown}]"


# --------------------------------------------------------------------------------------------
# Titles and labels
# --------------------------------------------------------------------------------------------


def stream_label(run: Results) -> str:
    name = str(run.config["stream"])
    if name in STREAM_LABELS:
        return STREAM_LABELS[name]
    source = run.stream.source
    # A trailing local path ("in /data/x", "from /data/x") says nothing.
    source = re.sub(r"\s+((in|from)\s+)?/\S*$", "", source)
    return f"{name} ({source})" if source else name


def metric_label(run: Results) -> str:
    family = run.metric_family
    return METRIC_LABELS.get(family, f"{family} accuracy" if family else "accuracy")


def figure_title(run: Results, what: str) -> str:
    return f"{stream_label(run)}: {metric_label(run)}\n{what}"


def step_labels(task_names: Sequence[str]) -> list[str]:
    """``"1: a·v·t"``: the training step, labelled by the task it trains."""
    return [f"{step + 1}: {name}" for step, name in enumerate(task_names)]


def _task_colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


def _new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained", dpi=DPI)


# --------------------------------------------------------------------------------------------
# Forgetting curves
# --------------------------------------------------------------------------------------------


def forgetting_curves(runs: Sequence[Results], strategies: Sequence[str] | None = None) -> Figure:
    """Accuracy on every task after every training step; one panel per sequential strategy."""
    import matplotlib

    groups = group_runs(runs, strategies)
    sequential = [g for g in groups if not g.joint]
    joint = [g for g in groups if g.joint]
    if not sequential:
        raise DataError(
            "forgetting curves need sequential runs; joint training has a single row "
            "(use --kind heatmap or compare)"
        )
    first = sequential[0].runs[0]
    tasks = first.task_names
    steps = np.arange(len(tasks))
    colors = _task_colors(len(tasks))
    with_summary = len(groups) > 1
    panels = len(sequential) + int(with_summary)
    with matplotlib.rc_context(_STYLE):
        fig = _new_figure(12, 1.3 + 4.3 * panels)
        axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
        for ax in axes[1 : len(sequential)]:  # strategies on one accuracy scale
            ax.sharey(axes[0])
        any_band = False
        for ax, group in zip(axes, sequential, strict=False):
            matrices = group.matrices
            mean = group.mean_matrix()
            band = len(group.runs) > 1
            any_band |= band
            for i, name in enumerate(tasks):
                style = {"color": colors[i], "marker": _MARKERS[i % len(_MARKERS)]}
                if i > 0:  # before the task is trained: faded, dotted, up to the step it starts
                    ax.plot(
                        steps[: i + 1],
                        mean[: i + 1, i],
                        linestyle=":",
                        linewidth=1.2,
                        alpha=0.45,
                        markersize=4,
                        gid=f"{group.label}|{name}|before",
                        **style,
                    )
                ax.plot(
                    steps[i:],
                    mean[i:, i],
                    linestyle="-",
                    linewidth=2.0,
                    markersize=6,
                    label=name,
                    gid=f"{group.label}|{name}",
                    **style,
                )
                if band:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        low = np.nanmin(matrices[:, i:, i], axis=0)
                        high = np.nanmax(matrices[:, i:, i], axis=0)
                    ax.fill_between(steps[i:], low, high, color=colors[i], alpha=0.12, lw=0)
            spread = ", band: min-max over seeds" if band else ""
            ax.set_title(f"{group.label}: {group.describe_seeds()}{spread}", loc="left")
            ax.set_ylabel("accuracy (%)")
            ax.grid(True, alpha=0.3)
        if with_summary:
            _aa_so_far_panel(axes[-1], sequential, joint)
        axes[-1].set_xticks(steps, step_labels(tasks), rotation=25, ha="right")
        axes[-1].set_xlabel("after training step (task just trained)")
        handles = [
            Line2D([], [], color=colors[i], marker=_MARKERS[i % len(_MARKERS)], lw=2, label=name)
            for i, name in enumerate(tasks)
        ]
        handles += [
            Line2D([], [], color="0.3", lw=2, label="after the task is trained"),
            Line2D([], [], color="0.3", lw=1.2, ls=":", alpha=0.6, label="before it is trained"),
        ]
        if any_band:
            handles.append(Patch(color="0.3", alpha=0.2, label="min-max over seeds"))
        fig.legend(
            handles=handles,
            loc="outside right upper",
            title="accuracy on task\n(missing pattern)",
            frameon=False,
        )
        fig.suptitle(figure_title(first, "accuracy on each task after each training step"))
    return fig


def _aa_so_far_panel(ax: Any, sequential: list[RunGroup], joint: list[RunGroup]) -> None:
    from matplotlib import colormaps

    palette = colormaps["Dark2"]
    for k, group in enumerate(sequential):
        rows = [run.aa_so_far for run in group.runs]
        if any(row is None for row in rows):
            raise DataError(f"{group.runs[0].directory}: results.json has no aa_so_far")
        values = np.array(rows, dtype=np.float64)
        mean = values.mean(axis=0)
        x = np.arange(values.shape[1])
        color = palette(k % palette.N)
        ax.plot(
            x,
            mean,
            color=color,
            marker="o",
            lw=2,
            label=f"{group.label} (n={len(group.runs)})",
            gid=f"aa_so_far|{group.label}",
        )
        if len(group.runs) > 1:
            std = values.std(axis=0, ddof=1)
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, lw=0)
    for k, group in enumerate(joint):
        aas = [run.aa for run in group.runs if run.aa is not None]
        if not aas:
            continue
        ax.axhline(
            float(np.mean(aas)),
            color=palette((len(sequential) + k) % palette.N),
            ls="--",
            lw=1.5,
            label=f"{group.label}: AA on all tasks (n={len(aas)})",
            gid=f"aa_joint|{group.label}",
        )
    ax.set_title(
        "AA so far: mean accuracy over the tasks trained so far (band: ± std over seeds)",
        loc="left",
    )
    ax.set_ylabel("AA so far (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", frameon=True, framealpha=0.85)


# --------------------------------------------------------------------------------------------
# Accuracy-matrix heatmap
# --------------------------------------------------------------------------------------------


def accuracy_heatmap(runs: Sequence[Results], strategies: Sequence[str] | None = None) -> Figure:
    """The accuracy matrix of each strategy (seed mean), values in the cells, NaN blank."""
    import matplotlib
    from matplotlib import colormaps

    groups = group_runs(runs, strategies)
    first = groups[0].runs[0]
    tasks = first.task_names
    means = [group.mean_matrix() for group in groups]
    finite = np.concatenate([m[np.isfinite(m)] for m in means])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
    if vmax - vmin < 1.0:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    cmap = colormaps["viridis"].with_extremes(bad="white")
    heights = [m.shape[0] + 1.2 for m in means]
    with matplotlib.rc_context(_STYLE):
        fig = _new_figure(
            1.9 + 1.25 * len(tasks), 2.3 + 0.62 * sum(heights) + 0.5 * (len(groups) - 1)
        )
        axes = fig.subplots(len(groups), 1, squeeze=False, height_ratios=heights)[:, 0]
        image = None
        for ax, group, mean in zip(axes, groups, means, strict=True):
            image = ax.imshow(
                np.ma.masked_invalid(mean), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto"
            )
            image.set_gid(f"heatmap|{group.label}")
            for (row, col), value in np.ndenumerate(mean):
                if not np.isfinite(value):
                    continue
                r, g, b = to_rgb(cmap((value - vmin) / (vmax - vmin)))
                dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                ax.text(
                    col,
                    row,
                    f"{value:.1f}",
                    ha="center",
                    va="center",
                    fontsize=10,
                    color="white" if dark else "black",
                )
            if group.joint:
                trained = group.runs[0].strategy.trained
                row = (
                    "trained on all\ntasks at once" if trained else "pre-trained only\n(zero-shot)"
                )
                ax.set_yticks([0], [row])
            else:
                ax.set_yticks(range(mean.shape[0]), step_labels(tasks[: mean.shape[0]]))
                for step in range(min(mean.shape)):  # the task trained at that step
                    ax.add_patch(
                        Rectangle(
                            (step - 0.44, step - 0.44), 0.88, 0.88, fill=False, ec="red", lw=2
                        )
                    )
            ax.set_xticks(range(len(tasks)), tasks, rotation=25, ha="right")
            ax.set_ylabel("" if group.joint else "after training step")
            ax.set_title(f"{group.label}: {group.describe_seeds()}", loc="left")
        axes[-1].set_xlabel("evaluated task (missing pattern)")
        assert image is not None
        fig.colorbar(image, ax=list(axes), label="accuracy (%)", shrink=0.9)
        note = "rows: after each training step, columns: evaluated task"
        if any(not g.joint for g in groups):
            note += "; red box: the task just trained"
        fig.suptitle(figure_title(first, f"accuracy matrix ({note})"))
    return fig


# --------------------------------------------------------------------------------------------
# Strategy comparison
# --------------------------------------------------------------------------------------------


def strategy_comparison(runs: Sequence[Results], strategies: Sequence[str] | None = None) -> Figure:
    """AA and FM per strategy: mean ± 95 % CI over seeds (error bars), each seed as a dot."""
    return comparison_figure(
        group_runs(runs, strategies),
        "strategy comparison: mean ± 95 % CI over seeds (dot, error bar); grey dots: each seed",
    )


# Beyond this many groups the labels no longer fit side by side: one row per group instead.
HORIZONTAL_ABOVE_GROUPS = 8
_COMPARED_METRICS: tuple[tuple[Metric, str, str], ...] = (
    ("aa", "AA: final average accuracy (%)", "AA (%)"),
    ("fm", "FM: forgetting, lower is better (pp)", "FM (percentage points)"),
)


@dataclass(frozen=True)
class _GroupValues:
    """One group's values of one metric, as drawn and as written in its label."""

    values: np.ndarray
    runs: int

    @property
    def mean(self) -> float:
        return float(self.values.mean())

    @property
    def half_width(self) -> float:
        """Of the 95 % confidence interval of the mean (Student t); 0 for one value."""
        from cmmm.significance import t_interval

        interval = t_interval(self.values.tolist())
        return 0.0 if interval is None or interval.half_width is None else interval.half_width

    @property
    def seeds(self) -> str:
        return f"n={self.runs} seed{'s' if self.runs > 1 else ''}"

    @property
    def text(self) -> str:
        if self.values.size < 2:
            return f"{self.mean:.2f}"
        return f"{self.mean:.2f} ± {self.half_width:.2f}"


def _group_values(group: RunGroup, key: Metric) -> _GroupValues:
    found = [r.aa if key == "aa" else r.fm for r in group.runs]
    values = [value for value in found if value is not None]
    return _GroupValues(np.array(values, dtype=np.float64), len(group.runs))


def comparison_figure(groups: Sequence[RunGroup], what: str) -> Figure:
    """AA and FM per group of runs (a strategy, an experiment's row): mean ± 95 % CI, seeds as
    dots.

    Up to ``HORIZONTAL_ABOVE_GROUPS`` groups stand side by side with their values in the tick
    labels; more (a whole Table 2) get one row each, the value written beside the point.
    """
    import matplotlib

    first = groups[0].runs[0]
    horizontal = len(groups) > HORIZONTAL_ABOVE_GROUPS
    style = {**_STYLE, "xtick.labelsize": 10 if len(groups) <= 5 else 8}
    with matplotlib.rc_context(style):
        if horizontal:
            fig = _new_figure(14.0, 1.6 + 0.42 * len(groups))
            axes = fig.subplots(1, 2, sharey=True)
        else:
            # Wide enough for a readable label per group, but never wider than a page.
            fig = _new_figure(min(max(9.0, 2.0 + 2.6 * len(groups)), 20.0), 5.6)
            axes = fig.subplots(1, 2)
        for ax, (key, title, axis_label) in zip(axes, _COMPARED_METRICS, strict=True):
            if horizontal:
                _draw_comparison_rows(ax, groups, key, first_panel=ax is axes[0])
                ax.set_xlabel(axis_label)
            else:
                _draw_comparison_columns(ax, groups, key)
                ax.set_ylabel(axis_label)
            ax.set_title(title, loc="left")
        fig.suptitle(figure_title(first, what))
    return fig


@dataclass(frozen=True)
class _Marks:
    errorbar: dict[str, float]
    seed_dot: float
    seed_jitter: float


# Rows are packed closer than columns: smaller marks keep them apart.
_COLUMN_MARKS = _Marks({"markersize": 9, "capsize": 8, "elinewidth": 2}, 22, 0.1)
_ROW_MARKS = _Marks({"markersize": 7, "capsize": 4, "elinewidth": 1.5}, 14, 0.08)


def _draw_group_point(
    ax: Any, position: int, drawn: _GroupValues, gid: str, horizontal: bool
) -> None:
    """The mean with its 95 % CI bar at ``position``, and each seed as a grey dot beside it."""
    marks = _ROW_MARKS if horizontal else _COLUMN_MARKS
    spread = [drawn.half_width] if drawn.values.size > 1 else None
    half_width = marks.seed_jitter
    jitter = np.linspace(-half_width, half_width, drawn.values.size) if spread else np.zeros(1)
    beside = position + jitter + 0.25
    style = {"fmt": "o", "color": "C0", **marks.errorbar}
    if horizontal:
        bar = ax.errorbar([drawn.mean], [position], xerr=spread, **style)
        ax.scatter(drawn.values, beside, s=marks.seed_dot, color="0.45", zorder=3)
    else:
        bar = ax.errorbar([position], [drawn.mean], yerr=spread, **style)
        ax.scatter(beside, drawn.values, s=marks.seed_dot, color="0.45", zorder=3)
    bar.lines[0].set_gid(gid)  # the mean marker


def _draw_comparison_columns(ax: Any, groups: Sequence[RunGroup], key: Metric) -> None:
    labels = []
    for k, group in enumerate(groups):
        drawn = _group_values(group, key)
        if drawn.values.size == 0:
            labels.append(f"{group.label}\n{group.missing_note()}\n{drawn.seeds}")
            continue
        _draw_group_point(ax, k, drawn, f"{key}|{group.label}", horizontal=False)
        labels.append(f"{group.label}\n{drawn.text}\n{drawn.seeds}")
    ax.set_xticks(np.arange(len(groups)), labels)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.margins(y=0.15)
    ax.grid(True, axis="y", alpha=0.3)


def _draw_comparison_rows(
    ax: Any, groups: Sequence[RunGroup], key: Metric, first_panel: bool
) -> None:
    from matplotlib.transforms import blended_transform_factory

    # Row positions in axes x, data y: where "n/a" goes for a group with no value.
    row_start = blended_transform_factory(ax.transAxes, ax.transData)
    labels = []
    for k, group in enumerate(groups):
        drawn = _group_values(group, key)
        labels.append(f"{group.label} ({drawn.seeds})")
        if drawn.values.size == 0:
            ax.text(
                0.02,
                k,
                group.missing_note(),
                transform=row_start,
                va="center",
                color="0.35",
                fontsize=9,
            )
            continue
        _draw_group_point(ax, k, drawn, f"{key}|{group.label}", horizontal=True)
        ax.annotate(
            drawn.text,
            (drawn.mean + drawn.half_width, k),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    if first_panel:
        ax.set_yticks(np.arange(len(groups)), labels)
        ax.set_ylim(len(groups) - 0.4, -0.6)  # the first group on top
    ax.margins(x=0.18)
    ax.grid(True, axis="x", alpha=0.3)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

PLOTTERS = {
    "curves": forgetting_curves,
    "heatmap": accuracy_heatmap,
    "compare": strategy_comparison,
}


def check_output(out: Path) -> None:
    if out.suffix.lower() not in SUFFIXES:
        raise ConfigError(
            f"--out {out}: unknown image type {out.suffix or '(no suffix)'!r}; "
            f"end the file name with {' or '.join(SUFFIXES)}"
        )


def save_figure(fig: Figure, out: Path) -> Path:
    check_output(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() != ".png":
        fig.savefig(out)
        return out
    fig.savefig(out, dpi=DPI, pil_kwargs={"optimize": True})
    if out.stat().st_size > PALETTE_ABOVE_BYTES:
        # Pictures go into READMEs: a big PNG is re-encoded with a 256-colour palette (median
        # cut, no dithering: the colours of lines, bands and cells stay as drawn).
        from PIL import Image

        with Image.open(out) as image:
            palette = image.convert("RGB").quantize(
                colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
            )
        palette.save(out, optimize=True)
    return out


def output_paths(out: Path, kind: str) -> dict[str, Path]:
    """``kind`` -> file; ``all`` writes ``<stem>-curves<suffix>`` and the others beside it."""
    if kind not in KINDS:
        raise ConfigError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    if kind != "all":
        return {kind: out}
    return {k: out.with_name(f"{out.stem}-{k}{out.suffix}") for k in PLOTTERS}


def plot(
    paths: Iterable[Path],
    out: Path,
    kind: str = "curves",
    strategies: Sequence[str] | None = None,
) -> list[Path]:
    """Read the runs under ``paths`` and write the figure(s) of ``kind``; returns the files."""
    check_output(out)
    targets = output_paths(out, kind)
    runs = find_results(paths)
    written = []
    for name, target in targets.items():
        fig = PLOTTERS[name](runs, strategies)
        written.append(save_figure(fig, target))
    return written
