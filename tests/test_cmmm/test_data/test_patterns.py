"""Missing patterns, their names and codes, and ``--task-order`` parsing."""

from __future__ import annotations

import itertools

import pytest

from cmmm.data.patterns import all_patterns, parse_task_order, pattern_code, pattern_name
from cmmm.errors import ConfigError

AVT = ("audio", "video", "text")


def present(pattern: tuple[bool, ...], modalities: tuple[str, ...] = AVT) -> set[str]:
    return {m for m, p in zip(modalities, pattern, strict=True) if p}


def test_default_order_for_three_modalities_is_method_md() -> None:
    # method.md: full; a missing; t missing; v missing; only a; only v; only t.
    expected_present = [
        {"audio", "video", "text"},
        {"video", "text"},
        {"audio", "video"},
        {"audio", "text"},
        {"audio"},
        {"video"},
        {"text"},
    ]
    patterns = all_patterns(3)
    assert [present(p) for p in patterns] == expected_present
    assert patterns[0] == (True, True, True)
    assert all(isinstance(flag, bool) for p in patterns for flag in p)


def test_default_order_names_and_codes() -> None:
    patterns = all_patterns(3)
    assert [pattern_code(p, AVT) for p in patterns] == ["avt", "vt", "av", "at", "a", "v", "t"]
    assert [pattern_name(p, AVT) for p in patterns] == [
        "a·v·t",
        "v·t, a missing",
        "a·v, t missing",
        "a·t, v missing",
        "a, v·t missing",
        "v, a·t missing",
        "t, a·v missing",
    ]


@pytest.mark.parametrize("m", [1, 2, 4, 5])
def test_every_non_empty_pattern_once(m: int) -> None:
    patterns = all_patterns(m)
    assert len(patterns) == 2**m - 1
    assert len(set(patterns)) == len(patterns)
    assert all(len(p) == m and any(p) for p in patterns)
    assert set(patterns) == {p for p in itertools.product([True, False], repeat=m) if any(p)}
    # Fewer missing modalities first; the full pattern leads.
    assert patterns[0] == (True,) * m
    missing_counts = [p.count(False) for p in patterns]
    assert missing_counts == sorted(missing_counts)


def test_four_modalities_has_fifteen_patterns() -> None:
    assert len(set(all_patterns(4))) == 15


def test_zero_modalities_is_an_error() -> None:
    with pytest.raises(ConfigError):
        all_patterns(0)


def test_pattern_name_examples() -> None:
    assert pattern_name((True, False, True), AVT) == "a·t, v missing"
    assert pattern_name((True, True, True), AVT) == "a·v·t"
    assert pattern_name((False, False, True), AVT) == "t, a·v missing"
    # Modalities without a short name use their first letter.
    assert pattern_name((True, False), ("pose", "depth")) == "p, d missing"


def test_parse_default() -> None:
    default = all_patterns(3)
    assert parse_task_order(None, AVT) == default
    assert parse_task_order("default", AVT) == default
    assert parse_task_order(" default ", AVT) == default


def test_parse_indices_are_one_based_into_default_order() -> None:
    default = all_patterns(3)
    assert parse_task_order("1,3,2", AVT) == [default[0], default[2], default[1]]
    assert parse_task_order("7,6,5,4,3,2,1", AVT) == default[::-1]
    assert parse_task_order(" 2 , 7 ", AVT) == [default[1], default[6]]


def test_parse_codes_in_any_letter_order() -> None:
    assert parse_task_order("tv", AVT) == parse_task_order("vt", AVT) == [(False, True, True)]
    assert parse_task_order("tva", AVT) == [(True, True, True)]
    assert parse_task_order("ta,v", AVT) == [(True, False, True), (False, True, False)]


def test_parse_mixed_indices_and_codes_subset() -> None:
    order = parse_task_order("avt,3,t", AVT)
    assert order == [(True, True, True), (True, True, False), (False, False, True)]


def test_parse_full_permutation_by_codes() -> None:
    order = parse_task_order("t,v,a,at,av,vt,avt", AVT)
    assert order == all_patterns(3)[::-1]


@pytest.mark.parametrize("spec", ["vt,tv", "1,avt", "3,3"])
def test_parse_rejects_repeats(spec: str) -> None:
    with pytest.raises(ConfigError, match="twice"):
        parse_task_order(spec, AVT)


@pytest.mark.parametrize("spec", ["x", "avx", "aa", "vt,q", "audio"])
def test_parse_rejects_unknown_codes(spec: str) -> None:
    with pytest.raises(ConfigError, match="is not a pattern") as info:
        parse_task_order(spec, AVT)
    # The message lists the valid codes.
    for code in ("avt", "vt", "at", "t"):
        assert code in str(info.value)


@pytest.mark.parametrize("index", ["0", "8", "12"])
def test_parse_rejects_out_of_range_indices(index: str) -> None:
    with pytest.raises(ConfigError, match=rf"task {int(index)} does not exist; use 1\.\.7"):
        parse_task_order(index, AVT)


@pytest.mark.parametrize("spec", [",", " , ,"])
def test_parse_rejects_empty_lists(spec: str) -> None:
    with pytest.raises(ConfigError, match="names no task"):
        parse_task_order(spec, AVT)


def test_parse_negative_index_is_not_a_pattern() -> None:
    with pytest.raises(ConfigError):
        parse_task_order("-1", AVT)


def test_parse_four_modalities() -> None:
    mods = ("audio", "video", "text", "pose")
    default = all_patterns(4)
    assert parse_task_order("15", mods) == [default[14]]
    assert parse_task_order("pta", mods) == [(True, False, True, True)]
    with pytest.raises(ConfigError, match="16 does not exist"):
        parse_task_order("16", mods)
