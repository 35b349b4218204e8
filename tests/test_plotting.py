"""Figures of finished runs (``cmmm.plotting`` and ``cmmm plot``), from fabricated results.json."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cmmm.cli import app
from cmmm.errors import ConfigError, DataError
from cmmm.plotting import (
    HORIZONTAL_ABOVE_GROUPS,
    accuracy_heatmap,
    forgetting_curves,
    plot,
    strategy_comparison,
    stream_label,
)
from cmmm.results import find_results

runner = CliRunner()
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TASKS = [("a·v·t", "avt"), ("v·t, a missing", "vt"), ("a·t, v missing", "at")]
NAMES = [name for name, _ in TASKS]

# Rows: after step j; columns: task i. Seed 1's first row has a cell that was not evaluated.
NAIVE_0 = [[76.3, 70.0, 60.0], [72.0, 74.0, 61.0], [65.0, 69.0, 75.0]]
NAIVE_1 = [[78.3, None, 58.0], [70.0, 76.0, 63.0], [61.0, 67.0, 77.0]]
OURS_0 = [[77.0, 71.0, 62.0], [76.5, 75.0, 63.0], [76.0, 74.5, 76.0]]
JOINT = [[74.0, 73.0, 72.0]]


def metrics(matrix: list[list[float | None]], joint: bool) -> dict:
    a = np.array([[np.nan if v is None else v for v in row] for row in matrix])
    if joint:
        return {"aa": float(np.nanmean(a[0])), "fm": None, "bwt": None, "aa_so_far": None}
    final = a[-1]
    forgetting = [np.nanmax(a[:-1, i]) - final[i] for i in range(len(final) - 1)]
    return {
        "aa": float(final.mean()),
        "fm": float(np.mean(forgetting)),
        "bwt": float(np.mean([final[i] - a[i, i] for i in range(len(final) - 1)])),
        "aa_so_far": [float(np.nanmean(a[j, : j + 1])) for j in range(len(a))],
    }


def write_run(
    root: Path,
    strategy: str,
    seed: int,
    matrix: list[list[float | None]],
    joint: bool = False,
    stream: str = "synthetic",
    tasks: list[tuple[str, str]] = TASKS,
) -> Path:
    run_dir = root / f"{stream}-{strategy}-seed{seed}-0123456789"
    run_dir.mkdir(parents=True)
    results = {
        "config": {"stream": stream, "strategy": strategy, "seed": seed, "epochs": 2},
        "stream": {
            "name": stream,
            "source": "fabricated for a test",
            "tasks": [
                {"index": i, "name": name, "code": code} for i, (name, code) in enumerate(tasks)
            ],
        },
        "strategy": {"name": strategy, "joint": joint, "options": {}},
        "metric_family": "mosi",
        "matrix": matrix,
        **metrics(matrix, joint),
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


@pytest.fixture()
def runs_dir(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    write_run(root, "naive", 0, NAIVE_0)
    write_run(root, "naive", 1, NAIVE_1)
    write_run(root, "ours", 0, OURS_0)
    write_run(root, "joint", 0, JOINT, joint=True)
    return root


def as_array(matrix: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in matrix])


def line(fig, gid: str):
    found = [ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid() == gid]
    assert len(found) == 1, (gid, [ln.get_gid() for ax in fig.axes for ln in ax.get_lines()])
    return found[0]


def test_curves_of_one_run_plot_its_matrix(runs_dir: Path) -> None:
    run = runs_dir / "synthetic-naive-seed0-0123456789"
    fig = forgetting_curves(find_results([run]))
    matrix = as_array(NAIVE_0)
    for i, name in enumerate(NAMES):
        learned = line(fig, f"naive|{name}")
        assert learned.get_label() == name  # named by the missing pattern, not an index
        np.testing.assert_array_equal(learned.get_xdata(), np.arange(i, 3))
        np.testing.assert_allclose(learned.get_ydata(), matrix[i:, i])
        if i > 0:  # before it is trained: drawn up to the step that trains it
            before = line(fig, f"naive|{name}|before")
            np.testing.assert_allclose(before.get_ydata(), matrix[: i + 1, i])
            assert before.get_linestyle() == ":"
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["1: a·v·t", "2: v·t, a missing", "3: a·t, v missing"]
    title = fig.get_suptitle()
    assert "synthetic" in title and "binary accuracy on non-zero labels" in title
    assert fig.axes[0].get_ylabel() == "accuracy (%)"
    assert len(fig.axes) == 1  # one strategy: no AA-so-far panel


def test_curves_of_several_seeds_plot_the_mean_with_a_band(runs_dir: Path) -> None:
    fig = forgetting_curves(find_results([runs_dir]), strategies=["naive"])
    seeds = np.stack([as_array(NAIVE_0), as_array(NAIVE_1)])
    mean = np.nanmean(seeds, axis=0)  # the missing cell of seed 1 is ignored, not zeroed
    for i, name in enumerate(NAMES):
        np.testing.assert_allclose(line(fig, f"naive|{name}").get_ydata(), mean[i:, i])
    assert "mean of 2 seeds" in fig.axes[0].get_title(loc="left")
    band = fig.axes[0].collections[0]  # task 0's min-max band
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(seeds[:, :, 0].min())
    assert ys.max() == pytest.approx(seeds[:, :, 0].max())


def test_curves_of_several_strategies_add_aa_so_far(runs_dir: Path) -> None:
    runs = find_results([runs_dir])
    fig = forgetting_curves(runs)
    assert len(fig.axes) == 3  # naive, ours, then AA so far (joint has no curves)
    expected = np.mean(
        [metrics(NAIVE_0, False)["aa_so_far"], metrics(NAIVE_1, False)["aa_so_far"]], 0
    )
    np.testing.assert_allclose(line(fig, "aa_so_far|naive").get_ydata(), expected)
    np.testing.assert_allclose(
        line(fig, "aa_so_far|ours").get_ydata(), metrics(OURS_0, False)["aa_so_far"]
    )
    joint = line(fig, "aa_joint|joint").get_ydata()
    assert joint[0] == pytest.approx(np.mean(JOINT[0]))
    np.testing.assert_allclose(line(fig, "ours|a·v·t").get_ydata(), as_array(OURS_0)[:, 0])


def test_curves_refuse_joint_only(runs_dir: Path) -> None:
    with pytest.raises(DataError, match="joint"):
        forgetting_curves(find_results([runs_dir]), strategies=["joint"])


def test_heatmap_shows_the_seed_mean_matrix_with_values(runs_dir: Path) -> None:
    fig = accuracy_heatmap(find_results([runs_dir]), strategies=["naive", "joint"])
    images = {ax.images[0].get_gid(): ax.images[0] for ax in fig.axes if ax.images}
    naive = images["heatmap|naive"].get_array()
    expected = np.nanmean(np.stack([as_array(NAIVE_0), as_array(NAIVE_1)]), axis=0)
    np.testing.assert_allclose(np.ma.filled(naive, np.nan), expected)
    joint = images["heatmap|joint"].get_array()
    assert joint.shape == (1, 3)
    np.testing.assert_allclose(joint, as_array(JOINT))
    naive_ax = next(ax for ax in fig.axes if ax.images and ax.images[0] is images["heatmap|naive"])
    texts = [t.get_text() for t in naive_ax.texts]
    assert f"{expected[0, 0]:.1f}" in texts and len(texts) == 9
    assert [t.get_text() for t in naive_ax.get_xticklabels()] == NAMES
    assert any(ax.get_ylabel() == "accuracy (%)" for ax in fig.axes)  # the colour bar


def test_heatmap_leaves_nan_cells_blank(tmp_path: Path) -> None:
    run = write_run(tmp_path, "naive", 0, [[70.0, None, None], [69.0, 71.0, None], NAIVE_0[2]])
    fig = accuracy_heatmap(find_results([run]))
    array = fig.axes[0].images[0].get_array()
    assert array.mask.sum() == 3
    assert len(fig.axes[0].texts) == 6


def test_compare_shows_aa_and_fm_with_spread(runs_dir: Path) -> None:
    fig = strategy_comparison(find_results([runs_dir]))
    aa = [metrics(NAIVE_0, False)["aa"], metrics(NAIVE_1, False)["aa"]]
    assert line(fig, "aa|naive").get_ydata()[0] == pytest.approx(np.mean(aa))
    fm = [metrics(NAIVE_0, False)["fm"], metrics(NAIVE_1, False)["fm"]]
    assert line(fig, "fm|naive").get_ydata()[0] == pytest.approx(np.mean(fm))
    aa_ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    # Two seeds: half-width t(0.975, 1) * s / sqrt(2) = 12.7062 * s / sqrt(2).
    half = 12.7062 * np.std(aa, ddof=1) / np.sqrt(2)
    assert aa_ticks[0] == f"naive\n{np.mean(aa):.2f} ± {half:.2f}\nn=2 seeds"
    fm_ticks = [t.get_text() for t in fig.axes[1].get_xticklabels()]
    assert "n/a (joint)" in fm_ticks[-1]  # joint last, no forgetting
    assert not [ln for ln in fig.axes[1].get_lines() if ln.get_gid() == "fm|joint"]


def test_compare_of_many_strategies_draws_one_row_each(tmp_path: Path) -> None:
    # A whole Table 2 does not fit side by side: one row per strategy, first strategy on top.
    names = [f"s{k:02d}" for k in range(HORIZONTAL_ABOVE_GROUPS + 1)]
    for k, name in enumerate(names):
        shifted = [[v + k for v in row] for row in NAIVE_0]
        write_run(tmp_path, name, 0, shifted)
        write_run(tmp_path, name, 1, NAIVE_0)
    write_run(tmp_path, "joint", 0, JOINT, joint=True)
    fig = strategy_comparison(find_results([tmp_path]))
    for k, name in enumerate(names):
        aa = [metrics(NAIVE_0, False)["aa"] + k, metrics(NAIVE_0, False)["aa"]]
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


def test_plot_all_writes_valid_png_and_svg(runs_dir: Path, tmp_path: Path) -> None:
    written = plot([runs_dir], tmp_path / "out" / "fig.png", kind="all")
    assert [p.name for p in written] == ["fig-curves.png", "fig-heatmap.png", "fig-compare.png"]
    for path in written:
        assert path.read_bytes()[:8] == PNG_SIGNATURE
    [svg] = plot([runs_dir], tmp_path / "fig.svg", kind="heatmap")
    assert ET.parse(svg).getroot().tag.endswith("svg")


def test_errors_name_the_path_or_suffix(runs_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nowhere"):
        find_results([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no results.json"):
        find_results([tmp_path / "empty"])
    with pytest.raises(ConfigError, match="'.jpg'"):
        plot([runs_dir], tmp_path / "fig.jpg")
    with pytest.raises(ConfigError, match="--strategy er"):
        plot([runs_dir], tmp_path / "fig.png", strategies=["er"])
    bad = write_run(tmp_path / "bad", "naive", 0, NAIVE_0[:2])  # 2 rows for 3 tasks
    with pytest.raises(DataError, match="3 x 3"):
        find_results([bad])


def test_runs_of_different_streams_are_not_mixed(tmp_path: Path) -> None:
    write_run(tmp_path, "naive", 0, NAIVE_0)
    write_run(tmp_path, "naive", 0, NAIVE_0, stream="mosi")
    with pytest.raises(DataError, match="several streams"):
        forgetting_curves(find_results([tmp_path]))


def test_stream_label_drops_a_local_path(tmp_path: Path) -> None:
    run = write_run(tmp_path, "naive", 0, NAIVE_0, stream="odd")
    [loaded] = find_results([run])
    loaded.data["stream"]["source"] = "odd features in /data/odd"
    assert stream_label(loaded) == "odd (odd features)"
    [mosi] = find_results([write_run(tmp_path / "m", "naive", 0, NAIVE_0, stream="mosi")])
    assert stream_label(mosi) == "CMU-MOSI (real, bc-LSTM features)"


def test_cli_plot_writes_the_file(runs_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "curves.png"
    result = runner.invoke(
        app, ["plot", str(runs_dir), "--strategy", "naive,ours", "--out", str(out)]
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
def test_cli_plot_errors_exit_2(runs_dir: Path, tmp_path: Path, args, fragment) -> None:
    values = {"missing": str(tmp_path / "missing-run"), "tmp": str(tmp_path), "runs": str(runs_dir)}
    result = runner.invoke(app, ["plot", *(a.format(**values) for a in args)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and fragment in errors[0], result.output
    assert not list(tmp_path.glob("x.*"))
