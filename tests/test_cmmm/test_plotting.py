"""Figures of finished runs (``cmmm.plotting`` and ``cmmm plot``), from real runs (conftest's
``finished_runs``: naive seeds 0 and 1, lwf, joint, three tasks each) and edited copies of them
where a test needs a case a run does not make (a cell not evaluated, another stream)."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from cmmm.cli import app
from cmmm.errors import ConfigError, DataError
from cmmm.plotting import (
    HORIZONTAL_ABOVE_GROUPS,
    accuracy_heatmap,
    forgetting_curves,
    metric_label,
    plot,
    strategy_comparison,
    stream_label,
)
from cmmm.results import RESULTS_FILE, Results, find_results

runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(finished_runs: Path) -> dict[tuple[str, int], Results]:
    """(strategy, seed) -> the real run."""
    return {(r.strategy.name, r.seed): r for r in find_results([finished_runs])}


def copy_run(
    run: Results,
    root: Path,
    strategy: str | None = None,
    seed: int | None = None,
    stream_name: str | None = None,
    **changes: Any,
) -> Path:
    """A copy of ``run`` under ``root``, as another strategy, seed or stream, with ``changes``
    to its fields; the copy's directory is returned."""
    strategy = strategy or run.strategy.name
    seed = run.seed if seed is None else seed
    stream = stream_name or run.config["stream"]
    copy = dataclasses.replace(
        run,
        config={**run.config, "strategy": strategy, "seed": seed, "stream": stream},
        strategy=dataclasses.replace(run.strategy, name=strategy),
        **changes,
    )
    run_dir = root / f"{stream}-{strategy}-seed{seed}-0123456789"
    run_dir.mkdir(parents=True)
    (run_dir / RESULTS_FILE).write_text(copy.dumps())
    return run_dir


def mean_of(*matrices: np.ndarray) -> np.ndarray:
    return np.nanmean(np.stack(matrices), axis=0)


def line(fig, gid: str):
    found = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid() == gid]
    assert len(found) == 1, (gid, [ln.get_gid() for ax in fig.axes for ln in ax.get_lines()])
    return found[0]


def test_curves_of_one_run_plot_its_matrix(runs) -> None:
    run = runs["naive", 0]
    fig = forgetting_curves([run])
    matrix = run.matrix_array()
    for i, name in enumerate(run.task_names):
        learned = line(fig, f"naive|{name}")
        assert learned.get_label() == name  # named by the missing pattern, not an index
        np.testing.assert_array_equal(learned.get_xdata(), np.arange(i, 3))
        np.testing.assert_allclose(learned.get_ydata(), matrix[i:, i])
        if i > 0:  # before it is trained: drawn up to the step that trains it
            before = line(fig, f"naive|{name}|before")
            np.testing.assert_allclose(before.get_ydata(), matrix[: i + 1, i])
            assert before.get_linestyle() == ":"
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == [f"{step + 1}: {name}" for step, name in enumerate(run.task_names)]
    title = fig.get_suptitle()
    assert "synthetic" in title and metric_label(run) in title
    assert metric_label(run) == "binary accuracy on non-zero labels (Acc-2)"
    assert fig.axes[0].get_ylabel() == "accuracy (%)"
    assert len(fig.axes) == 1  # one strategy: no AA-so-far panel


def test_curves_of_several_seeds_plot_the_mean_with_a_band(runs, finished_runs: Path) -> None:
    fig = forgetting_curves(find_results([finished_runs]), strategies=["naive"])
    seeds = np.stack([runs["naive", 0].matrix_array(), runs["naive", 1].matrix_array()])
    mean = seeds.mean(axis=0)
    for i, name in enumerate(runs["naive", 0].task_names):
        np.testing.assert_allclose(line(fig, f"naive|{name}").get_ydata(), mean[i:, i])
    assert "mean of 2 seeds" in fig.axes[0].get_title(loc="left")
    band = fig.axes[0].collections[0]  # task 0's min-max band
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(seeds[:, :, 0].min())
    assert ys.max() == pytest.approx(seeds[:, :, 0].max())


def test_a_cell_not_evaluated_is_left_out_of_the_seed_mean(runs, tmp_path: Path) -> None:
    first, second = runs["naive", 0], runs["naive", 1]
    matrix = [list(row) for row in second.matrix]
    matrix[0][1] = None
    copy_run(first, tmp_path)
    copy_run(second, tmp_path, matrix=matrix)
    fig = forgetting_curves(find_results([tmp_path]))
    name = first.task_names[1]
    before = line(fig, f"naive|{name}|before").get_ydata()
    # Step 0 of task 1: only seed 0 has it; the missing cell is ignored, not zeroed.
    assert before[0] == pytest.approx(first.matrix[0][1])
    expected = mean_of(first.matrix_array(), second.matrix_array())
    np.testing.assert_allclose(line(fig, f"naive|{name}").get_ydata(), expected[1:, 1])


def test_curves_of_several_strategies_add_aa_so_far(runs, finished_runs: Path) -> None:
    fig = forgetting_curves(find_results([finished_runs]))
    assert len(fig.axes) == 3  # naive, lwf, then AA so far (joint has no curves)
    expected = np.mean([runs["naive", 0].aa_so_far, runs["naive", 1].aa_so_far], 0)
    np.testing.assert_allclose(line(fig, "aa_so_far|naive").get_ydata(), expected)
    np.testing.assert_allclose(line(fig, "aa_so_far|lwf").get_ydata(), runs["lwf", 0].aa_so_far)
    joint = line(fig, "aa_joint|joint").get_ydata()
    assert joint[0] == pytest.approx(runs["joint", 0].aa)
    lwf = runs["lwf", 0]
    first_task = line(fig, f"lwf|{lwf.task_names[0]}").get_ydata()
    np.testing.assert_allclose(first_task, lwf.matrix_array()[:, 0])


def test_curves_refuse_joint_only(finished_runs: Path) -> None:
    with pytest.raises(DataError, match="joint"):
        forgetting_curves(find_results([finished_runs]), strategies=["joint"])


def test_heatmap_shows_the_seed_mean_matrix_with_values(runs, finished_runs: Path) -> None:
    fig = accuracy_heatmap(find_results([finished_runs]), strategies=["naive", "joint"])
    images = {ax.images[0].get_gid(): ax.images[0] for ax in fig.axes if ax.images}
    naive = images["heatmap|naive"].get_array()
    expected = mean_of(runs["naive", 0].matrix_array(), runs["naive", 1].matrix_array())
    np.testing.assert_allclose(np.ma.filled(naive, np.nan), expected)
    joint = images["heatmap|joint"].get_array()
    assert joint.shape == (1, 3)
    np.testing.assert_allclose(joint, runs["joint", 0].matrix_array())
    naive_ax = next(ax for ax in fig.axes if ax.images and ax.images[0] is images["heatmap|naive"])
    texts = [t.get_text() for t in naive_ax.texts]
    assert f"{expected[0, 0]:.1f}" in texts and len(texts) == 9
    assert [t.get_text() for t in naive_ax.get_xticklabels()] == runs["naive", 0].task_names
    assert any(ax.get_ylabel() == "accuracy (%)" for ax in fig.axes)  # the colour bar


def test_heatmap_leaves_nan_cells_blank(runs, tmp_path: Path) -> None:
    run = runs["naive", 0]
    last = run.matrix[2]
    matrix = [[last[0], None, None], [last[0], last[1], None], last]
    fig = accuracy_heatmap(find_results([copy_run(run, tmp_path, matrix=matrix)]))
    array = fig.axes[0].images[0].get_array()
    assert array.mask.sum() == 3
    assert len(fig.axes[0].texts) == 6


def test_compare_shows_aa_and_fm_with_spread(runs, finished_runs: Path) -> None:
    fig = strategy_comparison(find_results([finished_runs]))
    aa = [runs["naive", 0].aa, runs["naive", 1].aa]
    assert line(fig, "aa|naive").get_ydata()[0] == pytest.approx(np.mean(aa))
    fm = [runs["naive", 0].fm, runs["naive", 1].fm]
    assert line(fig, "fm|naive").get_ydata()[0] == pytest.approx(np.mean(fm))
    aa_ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    # Two seeds: half-width t(0.975, 1) * s / sqrt(2) = 12.7062 * s / sqrt(2).
    half = 12.7062 * np.std(aa, ddof=1) / np.sqrt(2)
    assert f"naive\n{np.mean(aa):.2f} ± {half:.2f}\nn=2 seeds" in aa_ticks
    fm_ticks = [t.get_text() for t in fig.axes[1].get_xticklabels()]
    assert "n/a (joint)" in fm_ticks[-1]  # joint last, no forgetting
    assert not [ln for ln in fig.axes[1].get_lines() if ln.get_gid() == "fm|joint"]


def test_compare_of_many_strategies_draws_one_row_each(runs, tmp_path: Path) -> None:
    # A whole Table 2 does not fit side by side: one row per strategy, first strategy on top.
    names = [f"s{k:02d}" for k in range(HORIZONTAL_ABOVE_GROUPS + 1)]
    base = runs["naive", 0]
    assert base.aa is not None
    for k, name in enumerate(names):
        copy_run(base, tmp_path, strategy=name, seed=0, aa=base.aa + k)
        copy_run(base, tmp_path, strategy=name, seed=1)
    copy_run(runs["joint", 0], tmp_path)
    fig = strategy_comparison(find_results([tmp_path]))
    for k, name in enumerate(names):
        aa = [base.aa + k, base.aa]
        marker = line(fig, f"aa|{name}")
        assert marker.get_xdata()[0] == pytest.approx(np.mean(aa))
        assert marker.get_ydata()[0] == k
        half = 12.7062 * np.std(aa, ddof=1) / np.sqrt(2)  # 95 % CI of two seeds
        assert f"{np.mean(aa):.2f} ± {half:.2f}" in [t.get_text() for t in fig.axes[0].texts]
    rows = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert rows == [f"{name} (n=2 seeds)" for name in names] + ["joint (n=1 seed)"]
    bottom, top = fig.axes[0].get_ylim()
    assert top < bottom  # the first row on top
    assert "n/a (joint)" in [t.get_text() for t in fig.axes[1].texts]
    assert fig.axes[0].get_xlabel() == "AA (%)"


def test_zeroshot_has_no_forgetting_because_it_trains_nothing(runs, tmp_path: Path) -> None:
    copy_run(runs["naive", 0], tmp_path)
    copy_run(runs["joint", 0], tmp_path)
    joint = runs["joint", 0]
    untrained = dataclasses.replace(
        joint, strategy=dataclasses.replace(joint.strategy, trains=False)
    )
    copy_run(untrained, tmp_path, strategy="zeroshot")  # a one-row matrix, as joint's
    fig = strategy_comparison(find_results([tmp_path]))
    fm_ticks = [t.get_text() for t in fig.axes[1].get_xticklabels()]
    assert any("n/a (not trained)" in tick for tick in fm_ticks if tick.startswith("zeroshot"))
    assert any("n/a (joint)" in tick for tick in fm_ticks if tick.startswith("joint"))


def test_plot_all_writes_valid_png_and_svg(finished_runs: Path, tmp_path: Path) -> None:
    written = plot([finished_runs], tmp_path / "out" / "fig.png", kind="all")
    assert [p.name for p in written] == ["fig-curves.png", "fig-heatmap.png", "fig-compare.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
    [svg] = plot([finished_runs], tmp_path / "fig.svg", kind="heatmap")
    assert ET.parse(svg).getroot().tag.endswith("svg")


def test_errors_name_the_path_or_suffix(runs, finished_runs: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        find_results([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no results.json"):
        find_results([tmp_path / "empty"])
    with pytest.raises(ConfigError, match="'.jpg'"):
        plot([finished_runs], tmp_path / "fig.jpg")
    with pytest.raises(ConfigError, match="--strategy er"):
        plot([finished_runs], tmp_path / "fig.png", strategies=["er"])
    run = runs["naive", 0]
    bad = copy_run(run, tmp_path / "bad", matrix=run.matrix[:2])  # 2 rows for 3 tasks
    with pytest.raises(DataError, match="3 x 3"):
        find_results([bad])


def test_runs_of_different_streams_are_not_mixed(runs, tmp_path: Path) -> None:
    copy_run(runs["naive", 0], tmp_path)
    copy_run(runs["naive", 0], tmp_path, stream_name="mosi")
    with pytest.raises(DataError, match="several streams"):
        forgetting_curves(find_results([tmp_path]))


def test_stream_label_drops_a_local_path(runs, tmp_path: Path) -> None:
    run = runs["naive", 0]
    odd = dataclasses.replace(run.stream, source="odd features in /data/odd")
    [loaded] = find_results([copy_run(run, tmp_path, stream_name="odd", stream=odd)])
    assert stream_label(loaded) == "odd (odd features)"
    [mosi] = find_results([copy_run(run, tmp_path / "m", stream_name="mosi")])
    assert stream_label(mosi) == "CMU-MOSI (real, bc-LSTM features)"


def test_cli_plot_writes_the_file(finished_runs: Path, tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    result = runner.invoke(
        app, ["plot", str(finished_runs), "--strategy", "naive,lwf", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["{missing}", "--out", "{tmp}/x.png"], "missing-run"),
        (["{runs}", "--out", "{tmp}/x.gif"], "'.gif'"),
        (["{runs}", "--out", "{tmp}/x.png", "--kind", "pie"], "--kind 'pie'"),
    ],
)
def test_cli_plot_errors_exit_2(finished_runs: Path, tmp_path: Path, args, fragment) -> None:
    values = {
        "missing": str(tmp_path / "missing-run"),
        "tmp": str(tmp_path),
        "runs": str(finished_runs),
    }
    result = runner.invoke(app, ["plot", *(a.format(**values) for a in args)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output
    assert not list(tmp_path.glob("x.*"))
