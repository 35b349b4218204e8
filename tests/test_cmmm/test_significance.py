"""95 % intervals, paired differences, and how `cmmm compare` shows them."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import results_like

import cmmm.running
import cmmm.significance as significance
from cmmm.comparison import compare, with_headroom
from cmmm.results import Results
from cmmm.running import RunConfig, atomic_write_text
from cmmm.significance import paired_difference, t_interval, t_quantile_975


def test_t_interval_by_hand() -> None:
    # mean 3, s = sqrt(2.5), t(0.975, 4) = 2.7764: 2.7764 * sqrt(2.5) / sqrt(5) = 1.9632.
    interval = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert interval is not None and interval.n == 5
    assert interval.mean == pytest.approx(3.0)
    assert interval.half_width == pytest.approx(1.9632, abs=1e-4)
    assert interval.text() == "3.00 ± 1.96"
    one = t_interval([7.5])
    assert one is not None and one.half_width is None and one.text() == "7.50"
    assert not one.excludes_zero
    assert t_interval([]) is None


def test_paired_difference_by_hand() -> None:
    # Seeds 0-2 pair (seed 3 has no partner): differences 1, 2, 1; mean 4/3, s = sqrt(1/3),
    # t(0.975, 2) = 4.3027: half-width 4.3027 * sqrt(1/3) / sqrt(3) = 1.4342 > 4/3.
    found = paired_difference({0: 10.0, 1: 12.0, 2: 11.0}, {0: 9.0, 1: 10.0, 2: 10.0, 3: 50.0})
    assert found is not None
    interval, seeds = found
    assert seeds == [0, 1, 2]
    assert interval.mean == pytest.approx(4 / 3)
    assert interval.half_width == pytest.approx(1.4342, abs=1e-4)
    assert not interval.excludes_zero
    # Differences 2, 2.5, 3: mean 2.5, s 0.5, half-width 4.3027 * 0.5 / sqrt(3) = 1.2421.
    interval, _ = paired_difference({0: 12.0, 1: 12.5, 2: 13.0}, {0: 10.0, 1: 10.0, 2: 10.0})
    assert interval.half_width == pytest.approx(1.2421, abs=1e-4)
    assert interval.excludes_zero and interval.text(signed=True) == "+2.50 ± 1.24"
    assert paired_difference({0: 1.0}, {1: 2.0}) is None


def test_t_quantile_without_scipy_matches_scipy() -> None:
    from scipy.stats import t

    for df in [1, 2, 3, 4, 7, 19, 30, 31, 45, 75, 150, 10_000]:
        assert significance._table_t975(df) == pytest.approx(t.ppf(0.975, df), abs=2e-4), df
        assert t_quantile_975(df) == pytest.approx(t.ppf(0.975, df), rel=1e-9)
    with pytest.raises(ValueError):
        t_quantile_975(0)


# Per strategy and seed: AA, and the final accuracy on tasks "avt" and "t".
AA = {
    "naive": [60.0, 62.0, 61.0],
    "ewc": [61.0, 63.5, 62.0],  # +1.0, +1.5, +1.0 over naive: mean 1.17 ± 0.72 -> significant
    "lwf": [58.0, 64.0, 62.5],  # -2, +2, +1.5: interval includes 0
    "zeroshot": [50.0, 51.0, 52.0],
}


# A real run's results (conftest's finished_run), cut to its first and last task, that
# fake_run gives made-up scores.
TEMPLATE: list[Results] = []


@pytest.fixture(autouse=True)
def template(finished_run: Results) -> Results:
    first, last = finished_run.stream.tasks[0], finished_run.stream.tasks[-1]
    two_tasks = dataclasses.replace(
        finished_run,
        stream=dataclasses.replace(finished_run.stream, tasks=[first, last]),
        per_task_final=[finished_run.per_task_final[0], finished_run.per_task_final[-1]],
    )
    TEMPLATE[:] = [two_tasks]
    return two_tasks


def fake_run(config: RunConfig, log: Any = print, **_: Any) -> dict[str, Any]:
    """A run whose AA is AA[strategy][seed]; its first task ends 5 above it, its last task 5
    plus the seed below it."""
    config = config.resolved()
    aa = AA[config.strategy][config.seed]
    first, last = TEMPLATE[0].per_task_final
    result = results_like(
        TEMPLATE[0],
        config,
        matrix=[[aa + 5.0, aa], [aa + 5.0, aa - 5.0 - config.seed]],
        per_task_final=[{**first, "acc": aa + 5.0}, {**last, "acc": aa - 5.0 - config.seed}],
        aa=aa,
        fm=1.0,
        bwt=-1.0,
        parameters={**TEMPLATE[0].parameters.to_json(), "trainable": 10},
        wall_time_seconds=1.0,
    )
    atomic_write_text(config.run_dir() / "results.json", json.dumps(result))
    return result


def test_compare_marks_significant_differences_and_counts_them(
    tmp_path: Path, monkeypatch, template: Results
) -> None:
    monkeypatch.setattr(cmmm.running, "run", fake_run)
    base = RunConfig(stream="synthetic", out=str(tmp_path), cache_dir=str(tmp_path / "c"))
    comparison = compare(base, ["naive", "ewc", "lwf", "zeroshot"], [0, 1, 2], log=lambda _: None)
    markdown = comparison.markdown()
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")]
        for line in markdown.split("###")[0].splitlines()
        if line.startswith("| ") and not line.startswith("| method")
    }
    assert "AA − naive (paired)" in markdown
    assert rows["naive"][4] == "reference"
    # ewc - naive: 1, 1.5, 1 -> mean 1.1667, s 0.2887, half 4.3027 * 0.2887 / 1.7321 = 0.7172.
    assert rows["ewc"][4] == "+1.17 ± 0.72 *"
    # lwf - naive: -2, 2, 1.5 -> mean 0.5, s = sqrt(9.5 / 2), half 4.3027 * 2.1794 / 1.7321 = 5.41.
    assert rows["lwf"][4] == "+0.50 ± 5.41"
    assert "**2 of 3 rows differ significantly from naive**" in markdown  # ewc and zeroshot
    records = {r["strategy"]: r for r in csv.DictReader(io.StringIO(comparison.csv()))}
    assert float(records["ewc"]["aa_diff_ci95"]) == pytest.approx(0.7172, abs=1e-4)
    assert records["ewc"]["aa_diff_significant"] == "True"
    assert records["lwf"]["aa_diff_significant"] == "False"
    assert records["naive"]["aa_diff_vs_reference"] == ""
    # AA's own interval: naive 60, 62, 61 -> 61 ± 4.3027 * 1 / sqrt(3) = 2.48.
    assert rows["naive"][2] == "61.00 ± 2.48"

    # Per task above zero-shot: the first is aa + 5 for every method, so the AA difference; the
    # last is aa - 5 - seed, where the seed cancels in the pairing.
    assert "### Above zero-shot, per task" in markdown
    assert "| ewc | +11.17 | +11.17 | +11.17 |" in markdown
    comparison.write(tmp_path)
    above = list(csv.DictReader(open(tmp_path / "compare-synthetic-above-zeroshot.csv")))
    last = template.stream.tasks[-1].code
    naive_t = [r for r in above if r["strategy"] == "naive" and r["task"] == last][0]
    assert float(naive_t["above_zeroshot_mean"]) == pytest.approx(10.0)
    # naive - zeroshot on t: 10, 11, 9 -> s = 1, half-width 4.3027 / sqrt(3) = 2.4841.
    assert float(naive_t["ci95"]) == pytest.approx(2.4841, abs=1e-4)
    assert naive_t["paired_seeds"] == "0 1 2"


def test_no_reference_row_no_difference_column(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(cmmm.running, "run", fake_run)
    base = RunConfig(stream="synthetic", out=str(tmp_path), cache_dir=str(tmp_path / "c"))
    markdown = compare(base, ["ewc", "lwf"], [0, 1], log=lambda _: None).markdown()
    assert "(paired)" not in markdown and "the reference naive has no runs here" in markdown
    assert "Above zero-shot" not in markdown


def test_headroom_rows_are_added_once() -> None:
    assert with_headroom(["ewc"], "naive") == ["ewc", "naive", "zeroshot", "joint"]
    assert with_headroom(["joint", "naive"], "naive") == ["joint", "naive", "zeroshot"]
    assert with_headroom(["ewc"], None) == ["ewc", "zeroshot", "joint"]


def test_verdicts_follow_the_papers_direction() -> None:
    above = paired_difference({0: 12.0, 1: 12.5, 2: 13.0}, {0: 10.0, 1: 10.0, 2: 10.0})
    below = paired_difference({0: 8.0, 1: 7.5, 2: 7.0}, {0: 10.0, 1: 10.0, 2: 10.0})
    unclear = paired_difference({0: 10.0, 1: 12.0, 2: 11.0}, {0: 9.0, 1: 10.0, 2: 10.0})
    assert significance.verdict(above, "above") == "reproduced"
    assert significance.verdict(above, "below") == "not reproduced"
    assert significance.verdict(below, "below") == "reproduced"
    assert significance.verdict(unclear, "above") == "undecided"
    assert significance.verdict(paired_difference({0: 1.0}, {0: 2.0}), "above") == "n/a"
    assert significance.verdict(None, "below") == "n/a"
    with pytest.raises(ValueError, match="claim"):
        significance.verdict(above, "higher")
    footer = significance.verdict_footer({"a": "reproduced", "b": "undecided", "c": "n/a"}, "r")
    assert "**1 reproduced, 0 not reproduced, 1 undecided** (1 with fewer than 2" in footer
