"""95 % confidence intervals over seeds, and paired differences against a reference row.

Every row of a comparison runs the same seeds, and a seed fixes the pre-trained backbone and the
data order every strategy starts from, so two rows pair seed by seed (on one machine: runs from
different pre-trained weights are left out of the pairs, ``SeedStatistics.pairable_seeds``). For a
row's AA over n seeds the interval is mean ± t(0.975, n - 1) * s / sqrt(n) (Student t, s the sample
standard deviation). Against the reference, the same interval is taken of the per-seed differences
(row - reference) over the seeds both finished: the difference is *significant* when that interval
excludes 0 (a paired t-test at the 5 % level, two-sided). With one seed there is no
interval, and nothing is called significant.

The t quantile comes from scipy when it is installed; otherwise from the table below (exact to
the 4 decimals printed in statistics tables for 1-30 degrees of freedom) with interpolation in
1/df beyond it, which is within 0.001 of the exact value.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

LEVEL = 0.95

# t(0.975, df) for df = 1..30, then 40, 60, 120 and infinity.
_T975 = {
    1: 12.7062,
    2: 4.3027,
    3: 3.1824,
    4: 2.7764,
    5: 2.5706,
    6: 2.4469,
    7: 2.3646,
    8: 2.3060,
    9: 2.2622,
    10: 2.2281,
    11: 2.2010,
    12: 2.1788,
    13: 2.1604,
    14: 2.1448,
    15: 2.1314,
    16: 2.1199,
    17: 2.1098,
    18: 2.1009,
    19: 2.0930,
    20: 2.0860,
    21: 2.0796,
    22: 2.0739,
    23: 2.0687,
    24: 2.0639,
    25: 2.0595,
    26: 2.0555,
    27: 2.0518,
    28: 2.0484,
    29: 2.0452,
    30: 2.0423,
    40: 2.0211,
    60: 2.0003,
    120: 1.9799,
}
_Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (>= 1)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    try:
        from scipy.stats import t as student_t
    except ImportError:
        return _table_t975(df)
    return float(student_t.ppf(0.975, df))


def _table_t975(df: int) -> float:
    if df in _T975:
        return _T975[df]
    # Between tabulated points t is very nearly linear in 1/df.
    known = sorted(_T975) + [math.inf]
    upper = next(k for k in known if k > df)
    lower = max(k for k in known if k < df)
    t_low, t_up = _T975[lower], _T975.get(upper, _Z975)
    x, x_low, x_up = 1 / df, 1 / lower, (0.0 if upper == math.inf else 1 / upper)
    return t_up + (t_low - t_up) * (x - x_up) / (x_low - x_up)


@dataclass(frozen=True)
class Interval:
    """A mean and the half-width of its 95 % interval (None with fewer than two values)."""

    mean: float
    half_width: float | None
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.half_width is not None and abs(self.mean) > self.half_width

    def text(self, signed: bool = False) -> str:
        mean = f"{self.mean:+.2f}" if signed else f"{self.mean:.2f}"
        return mean if self.half_width is None else f"{mean} ± {self.half_width:.2f}"


def t_interval(values: Sequence[float]) -> Interval | None:
    """Mean ± t(0.975, n-1) * s / sqrt(n); None for no values, no half-width for one."""
    if not values:
        return None
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return Interval(mean, None, n)
    half = t_quantile_975(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Interval(mean, half, n)


def half_width(values: Sequence[float]) -> float | None:
    """The 95 % interval's half-width of the mean of ``values``; None below two values."""
    interval = t_interval(values)
    return None if interval is None else interval.half_width


def paired_difference(
    row: Mapping[int, float], reference: Mapping[int, float]
) -> tuple[Interval, list[int]] | None:
    """The interval of ``row[s] - reference[s]`` over the seeds ``s`` both have, and those seeds."""
    seeds = sorted(set(row) & set(reference))
    interval = t_interval([row[s] - reference[s] for s in seeds])
    return None if interval is None else (interval, seeds)


def interval_cell(values: Sequence[float]) -> str:
    """``"mean ± 95 % half-width"`` for a table; one value as is; ``"n/a"`` for none."""
    interval = t_interval(values)
    return "n/a" if interval is None else interval.text()


def difference_cell(difference: tuple[Interval, list[int]] | None) -> str:
    """``"+1.23 ± 0.80 *"`` (``*``: the interval excludes 0), or ``"n/a"``."""
    if difference is None:
        return "n/a"
    interval = difference[0]
    return interval.text(signed=True) + (" *" if interval.excludes_zero else "")


def significance_footer(
    differences: Mapping[str, tuple[Interval, list[int]] | None], reference: str
) -> str:
    """The sentence under a table's paired column: how many rows differ significantly."""
    compared = [d for name, d in differences.items() if name != reference]
    decided = [d for d in compared if d is not None and d[0].half_width is not None]
    significant = sum(d[0].excludes_zero for d in decided)
    return (
        f"AA − {reference}: mean ± 95 % interval of the per-seed differences over the seeds "
        "both finished (paired Student t); * marks an interval that excludes 0. "
        f"**{significant} of {len(compared)} rows differ significantly from {reference}**"
        + (
            f" ({len(compared) - len(decided)} with fewer than 2 paired seeds)."
            if len(decided) < len(compared)
            else "."
        )
    )


# The paper's direction for a row against its table's reference row: the row's AA is above or
# below the reference's.
CLAIMS = ("above", "below")
VERDICTS = ("reproduced", "not reproduced", "undecided")


def verdict(difference: tuple[Interval, list[int]] | None, claim: str) -> str:
    """Whether a paired difference (row - reference) reproduces the paper's direction
    ``claim``: "reproduced" (the interval excludes 0 on the paper's side), "not reproduced"
    (it excludes 0 on the other side), "undecided" (it includes 0), or "n/a" (under 2 pairs)."""
    if claim not in CLAIMS:
        raise ValueError(f"claim must be one of {CLAIMS}, got {claim!r}")
    if difference is None or difference[0].half_width is None:
        return "n/a"
    interval = difference[0]
    if not interval.excludes_zero:
        return "undecided"
    return "reproduced" if (interval.mean > 0) == (claim == "above") else "not reproduced"


def verdict_footer(verdicts: Mapping[str, str], reference: str) -> str:
    """The sentence under a table's verdict column: how many claims each verdict got."""
    counts = {name: sum(v == name for v in verdicts.values()) for name in (*VERDICTS, "n/a")}
    told = ", ".join(f"{counts[name]} {name}" for name in VERDICTS)
    return (
        f"Verdict: the paper's direction of a row against {reference} (from its numbers, or "
        "its stated claim) is *reproduced* when the paired interval excludes 0 on that side, "
        "*not reproduced* when it excludes 0 on the other side, *undecided* when it includes "
        f"0. **{told}**"
        + (f" ({counts['n/a']} with fewer than 2 paired seeds)." if counts["n/a"] else ".")
    )
