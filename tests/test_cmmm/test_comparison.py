"""`cmmm compare`: runs what is missing, reuses what exists, and tabulates mean ± spread."""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import results_like
from typer.testing import CliRunner

import cmmm.running
from cmmm.cli import app
from cmmm.comparison import compare, expand_strategies
from cmmm.errors import ConfigError
from cmmm.results import Results
from cmmm.running import RunConfig, atomic_write_text


def quiet(_: str) -> None:
    pass


class CountingRun:
    """Wraps ``cmmm.running.run`` (or a fake) and counts the runs actually started."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[str, int]] = []

    def __call__(self, config: RunConfig, log: Any = print, **kwargs: Any) -> dict[str, Any]:
        self.calls.append((config.strategy, config.seed))
        return self.inner(config, log=log, **kwargs)


def fake_aa(strategy: str, seed: int) -> float:
    return 50.0 + 3.0 * len(strategy) + 2.0 * seed * seed


def fake_fm(strategy: str, seed: int) -> float:
    return 1.0 + 0.5 * seed - 0.1 * len(strategy)


# A real run's results (conftest's finished_run) that fake_run gives made-up scores.
TEMPLATE: list[Results] = []


@pytest.fixture(autouse=True)
def template(finished_run: Results) -> None:
    TEMPLATE[:] = [finished_run]


def fake_run(config: RunConfig, log: Any = print, **_: Any) -> dict[str, Any]:
    """What ``run`` writes, with made-up numbers that depend on strategy and seed."""
    config = config.resolved()
    options = {"mem_size": int(config.strategy.split("-")[1])} if "-" in config.strategy else {}
    result = results_like(
        TEMPLATE[0],
        config,
        strategy={"name": config.strategy, "joint": False, "options": options},
        aa=fake_aa(config.strategy, config.seed),
        fm=fake_fm(config.strategy, config.seed),
        bwt=-fake_fm(config.strategy, config.seed),
        parameters={**TEMPLATE[0].parameters.to_json(), "trainable": 1000 + len(config.strategy)},
        wall_time_seconds=10.0 + config.seed,
    )
    atomic_write_text(config.run_dir() / "results.json", json.dumps(result))
    return result


def ci(values: list[float]) -> str:
    """mean ± 95 % half-width (Student t, scipy's quantile), as the tables print it."""
    from scipy.stats import t

    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return f"{statistics.mean(values):.2f} ± {half:.2f}"


def table_rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("method",):
            rows[cells[0]] = cells
    return rows


def test_compare_runs_missing_runs_then_reuses_them(tiny_config, monkeypatch) -> None:
    counting = CountingRun(cmmm.running.run)
    monkeypatch.setattr(cmmm.running, "run", counting)
    base = tiny_config()
    first = compare(base, ["naive", "er-250"], [0, 1], log=quiet)
    assert sorted(counting.calls) == [("er-250", 0), ("er-250", 1), ("naive", 0), ("naive", 1)]
    assert [o.status for o in first.outcomes] == ["ran"] * 4
    stamps = {o.results_path: o.results_path.stat().st_mtime_ns for o in first.outcomes}

    logs: list[str] = []
    second = compare(base, ["naive", "er-250"], [0, 1], log=logs.append)
    assert len(counting.calls) == 4  # nothing ran again
    assert [o.status for o in second.outcomes] == ["reused"] * 4
    assert sum("reusing" in m for m in logs) == 4
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert second.markdown() == first.markdown()

    rows = table_rows(second.markdown())
    aa = [json.loads(o.results_path.read_text())["aa"] for o in first.outcomes[:2]]
    assert rows["naive"][1] == "-" and rows["er-250"][1] == "250"
    assert rows["naive"][2] == ci(aa)

    # A third seed runs only the missing pairs.
    compare(base, ["naive", "er-250"], [0, 1, 2], log=quiet)
    assert sorted(counting.calls[4:]) == [("er-250", 2), ("naive", 2)]


def test_tables_hold_mean_and_spread_of_the_runs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(cmmm.running, "run", fake_run)
    base = RunConfig(stream="synthetic", out=str(tmp_path), cache_dir=str(tmp_path / "c"))
    comparison = compare(base, ["naive", "er-500", "ewc"], [0, 1, 2], log=quiet)
    md_path, csv_path = comparison.write(tmp_path)
    assert md_path == tmp_path / "compare-synthetic.md"
    assert csv_path == tmp_path / "compare-synthetic.csv"

    rows = table_rows(md_path.read_text())
    assert list(rows) == ["naive", "er-500", "ewc"]
    records = {r["strategy"]: r for r in csv.DictReader(io.StringIO(csv_path.read_text()))}
    for strategy in ("naive", "er-500", "ewc"):
        aa = [fake_aa(strategy, s) for s in range(3)]
        fm = [fake_fm(strategy, s) for s in range(3)]
        cells = rows[strategy]
        assert cells[2] == ci(aa)
        assert cells[3] == ci(fm)
        assert cells[5] == f"{1000 + len(strategy):,}"
        assert cells[6] == "11.0"  # mean wall time of seeds 0, 1, 2: 10, 11, 12 s
        assert cells[7] == "3"
        record = records[strategy]
        assert float(record["aa_mean"]) == pytest.approx(statistics.mean(aa))
        assert float(record["aa_std"]) == pytest.approx(statistics.stdev(aa))
        assert float(record["fm_mean"]) == pytest.approx(statistics.mean(fm))
        assert float(record["fm_std"]) == pytest.approx(statistics.stdev(fm))
        assert record["seeds"] == "0 1 2" and record["failed_seeds"] == ""
    assert rows["er-500"][1] == records["er-500"]["buffer"] == "500"
    assert rows["ewc"][1] == "-" and records["ewc"]["buffer"] == ""
    # 3 strategies x wall times 10, 11, 12 s.
    assert "Total wall time of the 9 runs: 0.03 h (99 s, one run after another)." in (
        md_path.read_text()
    )


def test_a_failed_run_is_reported_and_the_others_continue(tmp_path: Path, monkeypatch) -> None:
    def flaky(config: RunConfig, log: Any = print, **kwargs: Any) -> dict[str, Any]:
        if config.strategy == "si" or (config.strategy == "lwf" and config.seed == 1):
            raise RuntimeError(f"boom {config.strategy} {config.seed}")
        return fake_run(config, log=log, **kwargs)

    monkeypatch.setattr(cmmm.running, "run", flaky)
    base = RunConfig(stream="synthetic", out=str(tmp_path), cache_dir=str(tmp_path / "c"))
    comparison = compare(base, ["lwf", "si", "naive"], [0, 1], log=quiet)
    statuses = {(o.strategy, o.seed): o.status for o in comparison.outcomes}
    assert statuses == {
        ("lwf", 0): "ran",
        ("lwf", 1): "failed",
        ("si", 0): "failed",
        ("si", 1): "failed",
        ("naive", 0): "ran",
        ("naive", 1): "ran",
    }
    markdown = comparison.markdown()
    rows = table_rows(markdown)
    assert rows["lwf"][2] == f"{fake_aa('lwf', 0):.2f}" and rows["lwf"][7] == "1 (1 failed)"
    assert rows["si"][2] == "failed" and rows["si"][7] == "0 (2 failed)"
    # One paired seed: a difference, but no interval and nothing significant.
    assert rows["lwf"][4] == f"{fake_aa('lwf', 0) - fake_aa('naive', 0):+.2f}"
    assert rows["si"][4] == "n/a"
    assert "- lwf seed 1: RuntimeError: boom lwf 1" in markdown
    # Nothing was written for the failed runs: the next comparison tries them again.
    calls = CountingRun(fake_run)
    monkeypatch.setattr(cmmm.running, "run", calls)
    compare(base, ["lwf", "si", "naive"], [0, 1], log=quiet)
    assert sorted(calls.calls) == [("lwf", 1), ("si", 0), ("si", 1)]


def test_finished_only_runs_nothing_and_tabulates_what_exists(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(cmmm.running, "run", fake_run)
    base = RunConfig(stream="synthetic", out=str(tmp_path), cache_dir=str(tmp_path / "c"))
    compare(base, ["naive"], [0, 1], log=quiet)
    compare(base, ["ewc"], [0], log=quiet)

    calls = CountingRun(fake_run)
    monkeypatch.setattr(cmmm.running, "run", calls)
    comparison = compare(base, ["naive", "ewc", "si"], [0, 1, 2], log=quiet, finished_only=True)
    assert calls.calls == []
    assert not replace(base, strategy="si", seed=0).resolved().run_dir().exists()
    statuses = {(o.strategy, o.seed): o.status for o in comparison.outcomes}
    assert [k for k, v in statuses.items() if v == "reused"] == [
        ("naive", 0),
        ("naive", 1),
        ("ewc", 0),
    ]
    markdown = comparison.markdown()
    rows = table_rows(markdown)
    aa = [fake_aa("naive", s) for s in (0, 1)]
    assert rows["naive"][2] == ci(aa)
    assert rows["naive"][7] == "2 (1 not run yet)"
    assert rows["ewc"][2] == f"{fake_aa('ewc', 0):.2f}" and rows["ewc"][7] == "1 (2 not run yet)"
    assert rows["si"][2] == "not run yet" and rows["si"][7] == "0 (3 not run yet)"
    assert "Not run yet (6 runs" in markdown and "si seed 2" in markdown
    records = {r["strategy"]: r for r in csv.DictReader(io.StringIO(comparison.csv()))}
    assert records["naive"]["missing_seeds"] == "2" and records["si"]["missing_seeds"] == "0 1 2"
    # Without the flag the same comparison runs exactly the missing pairs.
    compare(base, ["naive", "ewc", "si"], [0, 1, 2], log=quiet)
    assert sorted(calls.calls) == [
        ("ewc", 1),
        ("ewc", 2),
        ("naive", 2),
        ("si", 0),
        ("si", 1),
        ("si", 2),
    ]


def test_strategy_lists_expand_families_and_all() -> None:
    assert expand_strategies("naive, er,der-1000", "synthetic") == [
        "naive",
        "er-250",
        "er-500",
        "der-1000",
    ]
    every = expand_strategies("all", "iemocap")
    assert {"naive", "joint", "ewc", "lwf", "si"} <= set(every)
    for family in ("er", "agem", "icarl", "der"):
        assert f"{family}-500" in every and f"{family}-1000" in every
        assert f"{family}-250" not in every
    with pytest.raises(ConfigError, match="unknown strategy 'nope'.*valid names"):
        expand_strategies("naive,nope", "mosi")


def test_cli_compare_prints_and_writes_the_table(tmp_path: Path, monkeypatch) -> None:
    counting = CountingRun(fake_run)
    monkeypatch.setattr(cmmm.running, "run", counting)
    args = ["compare", "--stream", "synthetic", "--strategies", "naive,er", "--seeds", "2"]
    args += ["--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # zeroshot and joint are added to the list given (the headroom rows).
    assert len(counting.calls) == 10
    for name in ("naive", "er-250", "er-500", "zeroshot", "joint"):
        assert f"| {name} |" in result.output
    written = (tmp_path / "compare-synthetic.md").read_text()
    assert table_rows(written) == table_rows(result.output)
    assert (tmp_path / "compare-synthetic.csv").read_text().count("\n") == 6

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and len(counting.calls) == 10
    assert "reusing" in again.output

    finished = CliRunner().invoke(app, [*args[:6], "3", *args[7:], "--finished-only"])
    assert finished.exit_code == 0, finished.output
    assert len(counting.calls) == 10
    without = CliRunner().invoke(app, [*args, "--no-headroom", "--finished-only"])
    assert without.exit_code == 0 and "| zeroshot |" not in without.output
    assert "| naive | - |" in finished.output and "2 (1 not run yet)" in finished.output

    bad = CliRunner().invoke(app, [*args[:4], "naive,bogus", *args[5:]])
    assert bad.exit_code == 2 and "unknown strategy 'bogus'" in bad.output


# --------------------------------------------------------------------------------------------
# --orders K: the comparison under several random task orders
# --------------------------------------------------------------------------------------------


def order_dependent_run(config: RunConfig, log: Any = print, **_: Any) -> dict[str, Any]:
    """fake_run whose AA also depends on the task order's first task."""
    result = fake_run(config, log=log)
    first = int(config.task_order.split(",")[0])
    result["aa"] += first
    atomic_write_text(config.run_dir() / "results.json", json.dumps(result))
    return result


def test_random_task_orders_are_distinct_permutations_fixed_by_their_seed() -> None:
    from cmmm.comparison import random_task_orders

    orders = random_task_orders(5, 7, order_seed=3)
    assert len(set(orders)) == 5
    for order in orders:
        assert sorted(int(i) for i in order.split(",")) == list(range(1, 8))
    assert random_task_orders(5, 7, order_seed=3) == orders
    assert random_task_orders(3, 7, order_seed=3) == orders[:3]
    assert random_task_orders(5, 7, order_seed=4) != orders
    assert sorted(random_task_orders(6, 3)) == sorted(
        ",".join(p) for p in __import__("itertools").permutations("123")
    )
    with pytest.raises(ConfigError, match="only 6 orders"):
        random_task_orders(7, 3)
    with pytest.raises(ConfigError, match="must be >= 1"):
        random_task_orders(0, 7)


def test_compare_orders_reports_the_spread_across_orders(tmp_path: Path, monkeypatch) -> None:
    from cmmm.comparison import compare_orders, random_task_orders

    counting = CountingRun(order_dependent_run)
    monkeypatch.setattr(cmmm.running, "run", counting)
    base = RunConfig(stream="synthetic", out=str(tmp_path / "runs"), epochs=1)
    orders = random_task_orders(3, 7, order_seed=0)
    result = compare_orders(base, ["naive", "ewc"], [0, 1], orders, log=quiet)
    assert len(counting.calls) == 3 * 2 * 2  # orders x strategies x seeds
    firsts = [int(o.split(",")[0]) for o in orders]
    for row in result.rows:
        seed_mean = statistics.mean(fake_aa(row.strategy, s) for s in (0, 1))
        assert row.aa_by_order == pytest.approx([seed_mean + f for f in firsts])
        assert row.fm_by_order == pytest.approx(
            [statistics.mean(fake_fm(row.strategy, s) for s in (0, 1))] * 3
        )
    markdown = result.markdown()
    naive = table_rows(markdown)["naive"]
    expected = [statistics.mean(fake_aa("naive", s) for s in (0, 1)) + f for f in firsts]
    assert naive[1] == f"{statistics.mean(expected):.2f} ± {statistics.stdev(expected):.2f}"
    assert naive[3] == f"{min(expected):.2f}"
    assert all(f"`{o}`" in markdown for o in orders)
    # Again: everything is reused.
    compare_orders(base, ["naive", "ewc"], [0, 1], orders, log=quiet)
    assert len(counting.calls) == 12
    md_path, csv_path = result.write(tmp_path)
    assert md_path.name == "compare-synthetic-orders3.md"
    assert len(csv_path.read_text().splitlines()) == 1 + 3 * 2


def test_cli_compare_orders(tmp_path: Path, monkeypatch) -> None:
    from cmmm.comparison import random_task_orders

    monkeypatch.setattr(cmmm.running, "run", order_dependent_run)
    args = ["compare", "--strategies", "naive", "--seeds", "1", "--epochs", "1"]
    args += ["--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(app, [*args, "--orders", "2"])
    assert result.exit_code == 0, result.output
    assert "robustness to the task order" in result.stdout
    written = (tmp_path / "compare-synthetic-orders2.md").read_text()
    # Each order is also written as its patterns, in the order the tasks are trained.
    codes = ["avt", "vt", "av", "at", "a", "v", "t"]
    for order in random_task_orders(2, 7, 0):
        patterns = " > ".join(codes[int(i) - 1] for i in order.split(","))
        assert f"`{order}` ({patterns})" in written
    result = CliRunner().invoke(app, [*args, "--orders", "2", "--task-order", "t,a"])
    assert result.exit_code == 2 and "--task-order" in result.output
