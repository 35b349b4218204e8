"""Missing patterns (which modalities a task has), task orders and pairs of patterns.

A pattern is the tuple of present flags in the dataset's modality order, e.g. for (a, v, t)
``(False, True, True)`` is "audio missing". Everything that depends on a task depends on its
pattern, never on its index in the stream.
"""

from __future__ import annotations

import itertools

from cmmm.errors import ConfigError

Pattern = tuple[bool, ...]

# One letter per modality in task names and codes. The mfeat views need their own: "fou" and
# "fac" share a first letter (c: the profile correlations of "fac").
SHORT_NAMES = {
    "audio": "a",
    "video": "v",
    "text": "t",
    **{"fou": "f", "fac": "c", "kar": "k", "pix": "p", "zer": "z", "mor": "m"},
}


def short_name(modality: str) -> str:
    return SHORT_NAMES.get(modality, modality[:1])


def all_patterns(num_modalities: int) -> list[Pattern]:
    """Every non-empty pattern, in method.md's default order for three modalities.

    For (a, v, t): full; a missing; t missing; v missing; only a; only v; only t. The rule that
    gives this order for any M: fewer missing modalities first; among equals, the one whose
    missing set comes first in modality order, except that for M=3 method.md fixes (v, t), (a, v),
    (a, t), which is "missing a", "missing t", "missing v".
    """
    if num_modalities < 1:
        raise ConfigError("a stream needs at least one modality")
    if num_modalities == 3:
        return [
            (True, True, True),
            (False, True, True),
            (True, True, False),
            (True, False, True),
            (True, False, False),
            (False, True, False),
            (False, False, True),
        ]
    out: list[Pattern] = []
    for n_missing in range(num_modalities):
        for missing in itertools.combinations(range(num_modalities), n_missing):
            out.append(tuple(i not in missing for i in range(num_modalities)))
    return out


def pattern_name(pattern: Pattern, modalities: tuple[str, ...]) -> str:
    """Human name, e.g. ``"a·t, v missing"`` or ``"a·v·t"`` for the full pattern."""
    present = "·".join(short_name(m) for m, p in zip(modalities, pattern, strict=True) if p)
    missing = "·".join(short_name(m) for m, p in zip(modalities, pattern, strict=True) if not p)
    return present if not missing else f"{present}, {missing} missing"


def pattern_code(pattern: Pattern, modalities: tuple[str, ...]) -> str:
    """Compact code of the present modalities, e.g. ``"vt"``; used on the command line."""
    return "".join(short_name(m) for m, p in zip(modalities, pattern, strict=True) if p)


def parse_task_order(
    spec: str | None, modalities: tuple[str, ...], flag: str = "--task-order"
) -> list[Pattern]:
    """Parse ``--task-order`` (or another ``flag`` naming patterns the same way).

    Accepts ``None``/``"default"``, 1-based indices into the default order (``"1,3,2"``), or
    codes of the present modalities (``"avt,vt,t"``). Any permutation or subset is allowed;
    repeats and unknown entries are errors that say why.
    """
    default = all_patterns(len(modalities))
    if spec is None or spec.strip() in ("", "default"):
        return default
    by_code = {pattern_code(p, modalities): p for p in default}
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise ConfigError(f"{flag} {spec!r} names no task")
    order: list[Pattern] = []
    for item in items:
        # ASCII digits only: str.isdigit() also accepts "²", which int() refuses.
        if item.isascii() and item.isdigit():
            # int() refuses more than 4300 digits; a number that long is out of range anyway.
            digits = item.lstrip("0") or "0"
            k = int(digits) if len(digits) <= 6 else None
            if k is None or not 1 <= k <= len(default):
                shown = k if k is not None else f"{digits[:6]}... ({len(digits)} digits)"
                raise ConfigError(
                    f"{flag}: task {shown} does not exist; use 1..{len(default)} "
                    f"(default order: {', '.join(by_code)})"
                )
            pattern = default[k - 1]
        else:
            code = "".join(sorted(item, key=lambda c: "".join(map(short_name, modalities)).find(c)))
            if code not in by_code:
                raise ConfigError(
                    f"{flag}: {item!r} is not a pattern; write the present modalities "
                    f"as one of {', '.join(by_code)}"
                )
            pattern = by_code[code]
        if pattern in order:
            raise ConfigError(f"{flag}: {item!r} appears twice; each missing case is one task")
        order.append(pattern)
    return order


def parse_eval_patterns(
    spec: str | None, modalities: tuple[str, ...], trained: list[Pattern]
) -> list[Pattern]:
    """Parse ``--eval-patterns``: held-out missing cases to test on, never trained on.

    ``""``/``None``: none. ``"unseen"``: every pattern no task in ``trained`` has. Otherwise the
    syntax of ``--task-order`` (codes such as ``"a,v,t"`` or 1-based indices).
    """
    if spec is None or not spec.strip():
        return []
    if spec.strip() == "unseen":
        unseen = [p for p in all_patterns(len(modalities)) if p not in trained]
        if not unseen:
            raise ConfigError(
                "--eval-patterns unseen: the tasks train on every pattern, so none is left "
                "unseen; train on a subset with --task-order (e.g. avt,vt,at,av)"
            )
        return unseen
    if spec.strip() == "default":
        raise ConfigError("--eval-patterns: write 'unseen' or the patterns, e.g. 'a,v,t'")
    return parse_task_order(spec, modalities, flag="--eval-patterns")


def nearest_pattern(pattern: Pattern, candidates: list[Pattern]) -> Pattern:
    """The candidate closest to ``pattern``: fewest modalities that differ (Hamming); among
    equals, the one sharing the most present modalities (what a prompt set can have learned to
    use), then the first in ``candidates``."""
    if not candidates:
        raise ConfigError("no pattern to choose from")

    def cost(candidate: Pattern) -> tuple[int, int]:
        differ = sum(a != b for a, b in zip(pattern, candidate, strict=True))
        shared = sum(a and b for a, b in zip(pattern, candidate, strict=True))
        return differ, -shared

    return min(candidates, key=cost)


def swap_pairs(num_modalities: int) -> list[tuple[Pattern, Pattern]]:
    """Every pair of distinct patterns that swapping the first and the last modality of the
    layout maps onto each other, in ``all_patterns`` order. For (audio, video, text) that is
    method.md's audio<->text swap: [(v,t), (a,v)] and [(a), (t)]."""
    pairs: list[tuple[Pattern, Pattern]] = []
    seen: set[frozenset[Pattern]] = set()
    for p in all_patterns(num_modalities):
        q = (p[-1], *p[1:-1], p[0]) if len(p) > 1 else p
        if q != p and frozenset((p, q)) not in seen:
            seen.add(frozenset((p, q)))
            pairs.append((p, q))
    return pairs


def parse_pattern_pairs(
    spec: str, modalities: tuple[str, ...], flag: str
) -> list[tuple[Pattern, Pattern]]:
    """A comma list of code pairs such as "vt-av,a-t" (codes of the present modalities, any
    letter order); errors start with ``flag``. An empty list names no pair."""
    by_code = {pattern_code(p, modalities): p for p in all_patterns(len(modalities))}
    letters = "".join(short_name(m) for m in modalities)
    pairs = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        codes = [c.strip() for c in item.split("-")]
        if len(codes) != 2:
            raise ConfigError(f"{flag} item {item!r} must be two codes joined by '-', e.g. 'vt-av'")
        pair = []
        for code in codes:
            normal = "".join(sorted(code, key=letters.find))
            if normal not in by_code:
                raise ConfigError(
                    f"{flag}: {code!r} is not a pattern; use one of {', '.join(by_code)}"
                )
            pair.append(by_code[normal])
        if pair[0] == pair[1]:
            raise ConfigError(f"{flag} item {item!r} pairs a pattern with itself")
        pairs.append((pair[0], pair[1]))
    return pairs
