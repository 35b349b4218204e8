"""The method (method.md): modality-specific, task-aware and task-specific prompts on a frozen MulT,
with a contrastive loss between the task-aware prompts of missing patterns.

Two strategies share this file: ``ours`` (continual, one experience per missing pattern) and
``joint-ours`` (the paper's "Upperbound (ours)": the same prompts trained jointly on all tasks).
Every reconstructed choice of method.md is a field of ``OursOptions`` with method.md's default.

Prompts (L x d each, d = the model width, only on the cross-modal transformers; the memory
self-attention transformers get none):

* P_m, one per modality, shared by all tasks, attached to the branch of target m (the two
  cross-modal transformers whose target is m; in general the M-1 of them).
* The task-aware prompt P_TA = sum_m P^_m with P^_m = (delta_m k- + (1 - delta_m) k+) (.) P_m,
  delta_m = 1 when m is missing in the sample; one P_TA per sample, the same for every branch.
  ``task_aware_combine="concat"`` concatenates the P^_m along the length instead (M*L tokens).
* Task-specific prompts: one set {P_TS,m^k} per missing pattern k (every non-empty pattern of
  ``all_patterns(M)``, whatever the stream holds), selected per sample by its missing pattern, so
  a batch may mix patterns. While training an experience only its pattern's set has
  ``requires_grad`` (and enters the optimizer); ``joint-ours`` trains every set.

Everything is keyed by the pattern (the tuple of present flags), never by the task index: a
permuted task order builds the same prompts and the same loss.

The contrastive task loss (``contrastive_task_loss``) is added by its own plugin in
``before_backward``: L = L_task + lam * L_con.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmmm.backbone import IndexedPrompt, MulT, PromptContext, PromptSite
from cmmm.data.patterns import Pattern, all_patterns, nearest_pattern, pattern_code, short_name
from cmmm.errors import ConfigError
from cmmm.options import Option, parse_comma_list, parse_layers
from cmmm.prompted_model import (
    TRAINABLE_HEADS,
    PromptedModel,
    make_prompt_template,
    set_requires_grad,
)
from cmmm.strategy import STRATEGIES, Strategy, StrategyContext

PROMPT_TYPES = ("m", "ta", "ts")
PLACEMENTS = ("front", "back")
COMBINES = ("sum", "concat")
TASK_IDENTITIES = ("pattern", "oracle")
TASK_SPECIFIC_FORMS = ("per_pattern", "compositional")
COMPOSITIONAL_UPDATES = ("current", "unused")
UNSEEN_RULES = ("nearest", "own")
# trainable_head value: a copy of the backbone's output layer per missing pattern.
PATTERN_HEAD = "pattern"


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------


def _layer_list(owner: str, name: str, raw: Any) -> list[int] | None:
    if isinstance(raw, str) and raw.strip().lower() == "auto":
        return None
    return list(parse_layers(owner, name, raw))


# One declaration per option: default, type, limits and the one-line help of `cmmm list
# strategies`; the OursOptions docstring has the detail.
OURS_OPTIONS: dict[str, Option] = {
    "use_modality": Option(True, bool, "modality-specific prompts P_m on/off (Table 3)"),
    "use_task_aware": Option(True, bool, "task-aware prompt P_TA on/off (Table 3)"),
    "use_task_specific": Option(True, bool, "task-specific prompts P_TS on/off (Table 3)"),
    "order": Option(
        "m,ta,ts",
        str,
        "order of the prompt types over the layers, e.g. 'ta,m,ts' (Table 5)",
        parser=parse_comma_list,
    ),
    "placement": Option(
        "front",
        str,
        "front or back: layer blocks from the first or against the last layer (Table 6)",
        choices=PLACEMENTS,
    ),
    "depth_m": Option(1, int, "layers carrying P_m", minimum=0),
    "depth_ta": Option(1, int, "layers carrying P_TA", minimum=0),
    "depth_ts": Option(1, int, "layers carrying P_TS", minimum=0),
    "layers_m": Option(
        None,
        list,
        "explicit layers of P_m, e.g. '0,1' (replaces the computed ones)",
        nullable=True,
        parser=_layer_list,
    ),
    "layers_ta": Option(None, list, "explicit layers of P_TA", nullable=True, parser=_layer_list),
    "layers_ts": Option(None, list, "explicit layers of P_TS", nullable=True, parser=_layer_list),
    "prompt_length": Option(16, int, "prompt length L in tokens (Figure 5)", minimum=1),
    "prompt_dim": Option(
        None,
        int,
        "prompt width; must equal the model width d (None: d)",
        minimum=1,
        nullable=True,
    ),
    "prompt_init_std": Option(0.02, float, "std of the normal prompt initialisation", minimum=0),
    "key_init": Option(1.0, float, "initial value of the missing/present keys k- and k+"),
    "task_aware_combine": Option(
        "sum", str, "sum or concat of the masked P_m into P_TA", choices=COMBINES
    ),
    "tau": Option(0.5, float, "temperature of the contrastive task loss (> 0)"),
    "beta": Option(1.0, float, "weight of the single-modality positive pair (Table 4)", minimum=0),
    "lam": Option(
        0.1,
        float,
        "weight lambda of the contrastive loss; 0 turns it off (Table 4)",
        minimum=0,
    ),
    "positive_pairs": Option(
        "swap",
        str,
        "'swap' (audio<->text) or code pairs like 'vt-av,a-t'",
        parser=parse_comma_list,
    ),
    "trainable_head": Option(
        PATTERN_HEAD,
        str,
        "pattern (default: chosen on mfeat validation, +10 AA at FM ~0 and 3 % trainable): one "
        "output layer per missing pattern, trained with its task-specific set; none, out or "
        "all: which shared head layers train besides the prompts",
        choices=(*TRAINABLE_HEADS, PATTERN_HEAD),
    ),
    "task_identity": Option(
        "pattern",
        str,
        "pattern (from the sample's presence mask) or oracle (the task label)",
        choices=TASK_IDENTITIES,
    ),
    "task_specific_form": Option(
        "per_pattern",
        str,
        "per_pattern (one set per missing case, 2^M-1 sets) or compositional "
        "(summed per-modality present/missing components, 2M)",
        choices=TASK_SPECIFIC_FORMS,
    ),
    "compositional_update": Option(
        "current",
        str,
        "compositional only: current (train the task's M components) or "
        "unused (train only components no earlier task trained, then freeze them)",
        choices=COMPOSITIONAL_UPDATES,
    ),
    "unseen_patterns": Option(
        "nearest",
        str,
        "nearest (an untrained pattern uses the nearest trained pattern's set) or "
        "own (its own set: random if per_pattern, composed if compositional)",
        choices=UNSEEN_RULES,
    ),
}


def _default(name: str) -> Any:
    return OURS_OPTIONS[name].default


@dataclass
class OursOptions:
    """Every choice method.md leaves open ([R]), with its default there.

    Layers (indices into the cross-modal transformers' layers, 0-based): with ``placement``
    "front" the prompt types, taken in ``order``, occupy consecutive blocks from layer 0
    (``depth_m`` = M1 layers of P_m, then ``depth_ta`` = M2 of P_TA, then ``depth_ts`` = M3 of
    P_TS; default layers 0, 1, 2); "back" puts the same blocks against the last layer (Table 6).
    A disabled type takes no layers (as if its depth were 0). ``layers_m``/``layers_ta``/
    ``layers_ts`` (a list, or a comma string like "0,1") replace the computed layers of that type;
    where two types share a layer their prompts are concatenated along the length, in ``order``.

    ``prompt_dim`` must equal the model width d (None: d); a different value is rejected (no
    linear map: method.md's prompts live in the width-d key/value space).

    ``trainable_head``: method.md does not say whether the head trains. "pattern" (the default
    since issue 18's study; not in the paper) gives every missing pattern its own copy of the
    pre-trained ``out_layer``, part of that pattern's task-specific set: it trains only in its
    pattern's experience, so it cannot forget, and a sample reads the output layer its
    task-specific prompts come from. On real mfeat (10 epochs, 3 seeds, chosen on validation) it
    lifted validation AA by about 10 points over prompts alone at FM about 0, with 3.0 % of the
    backbone trainable (the paper reports 2-3 %). "none" (the default before) trains prompts
    only (1.4 %); "out" also trains the shared ``out_layer``; "all" also ``proj1`` and
    ``proj2``; a shared head is trained by every task and so can forget.

    ``task_identity``: "pattern" (default) selects each sample's task-specific prompts and its
    task-aware mask from the sample's own presence mask. "oracle" uses the pattern of the task the
    stream says the sample belongs to (Avalanche's task label) wherever Avalanche runs the model,
    i.e. in training. The runner's evaluator passes no task labels, so at test time "oracle" reads
    the presence mask too; on these streams every sample of a task carries exactly that task's
    pattern, so the two coincide (tests/test_ours.py checks it).

    ``task_specific_form``: "per_pattern" (method.md: one task-specific set per missing case, so
    2^M - 1 sets) or "compositional" (not in the paper; the ``ours-compositional`` strategy): the
    set of pattern k is the sum over modalities m of a component C_m^present or C_m^missing, so
    2M components serve every pattern, seen or not. ``compositional_update``: "current" trains
    the M components of the current task (components are shared, so old tasks can drift);
    "unused" trains only components no earlier task has trained and freezes them afterwards (no
    drift, but later tasks may find nothing left to train but the shared prompts).

    ``unseen_patterns``: which task-specific set a sample gets whose pattern no task has trained
    yet (a held-out pattern of ``--eval-patterns``, or a later task's before its turn). "nearest"
    (default for per-pattern sets; not in the paper): the set of the nearest trained pattern
    (``cmmm.data.patterns.nearest_pattern``: fewest differing modalities, then most shared present
    ones), since an untrained set is only its random initialisation. "own": the pattern's own
    set, which for the compositional form is composed from trained components (that strategy's
    default).

    ``positive_pairs``: "swap" (default) = the pairs of patterns related by swapping the first and
    the last modality of the layout, which for (audio, video, text) is method.md's audio<->text
    swap: {v,t}<->{a,v} and {a}<->{t}. Or an explicit list of code pairs, e.g. "vt-av,a-t" (Table
    4's ablations: "a-t" or "vt-av" alone). A pair of single-modality patterns is weighted by
    ``beta``, any other pair by 1. ``lam`` = 0 turns the loss off; so does
    ``use_task_aware=false`` (the loss is defined on the task-aware prompts).
    """

    use_modality: bool = _default("use_modality")
    use_task_aware: bool = _default("use_task_aware")
    use_task_specific: bool = _default("use_task_specific")
    order: str = _default("order")
    placement: str = _default("placement")
    depth_m: int = _default("depth_m")
    depth_ta: int = _default("depth_ta")
    depth_ts: int = _default("depth_ts")
    layers_m: list[int] | None = _default("layers_m")
    layers_ta: list[int] | None = _default("layers_ta")
    layers_ts: list[int] | None = _default("layers_ts")
    prompt_length: int = _default("prompt_length")
    prompt_dim: int | None = _default("prompt_dim")
    prompt_init_std: float = _default("prompt_init_std")
    key_init: float = _default("key_init")
    task_aware_combine: str = _default("task_aware_combine")
    tau: float = _default("tau")
    beta: float = _default("beta")
    lam: float = _default("lam")
    positive_pairs: str = _default("positive_pairs")
    trainable_head: str = _default("trainable_head")
    task_identity: str = _default("task_identity")
    task_specific_form: str = _default("task_specific_form")
    compositional_update: str = _default("compositional_update")
    unseen_patterns: str = _default("unseen_patterns")

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> OursOptions:
        """Validate and normalise user options against ``OURS_OPTIONS``."""
        unknown = sorted(set(options) - set(OURS_OPTIONS))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {', '.join(unknown)} for ours/joint-ours; valid options: "
                f"{', '.join(OURS_OPTIONS)}"
            )
        values = {
            name: OURS_OPTIONS[name].parse("ours", name, raw) for name, raw in options.items()
        }
        return cls(**values).check()

    def check(self) -> OursOptions:
        """The rules that involve more than one option (each option's own are in OURS_OPTIONS)."""
        if not self.tau > 0:
            raise ConfigError(f"ours: tau must be > 0, got {self.tau}")
        self.prompt_order()  # validates
        if not self.enabled_types() and self.trainable_head == "none":
            raise ConfigError(
                "ours: every prompt type is off and the head is frozen: nothing would train"
            )
        for kind in self.enabled_types():
            if getattr(self, f"depth_{kind}") == 0 and getattr(self, f"layers_{kind}") is None:
                raise ConfigError(
                    f"ours: use_{_USE_FLAG[kind]} is on but depth_{kind} is 0 and no layers_{kind}"
                    f" is given; turn use_{_USE_FLAG[kind]} off instead"
                )
        return self

    def prompt_order(self) -> tuple[str, ...]:
        items = tuple(s.strip() for s in self.order.split(",") if s.strip())
        if sorted(items) != sorted(PROMPT_TYPES):
            raise ConfigError(
                f"ours: order must name each of {', '.join(PROMPT_TYPES)} once (e.g. "
                f"'m,ta,ts'), got {self.order!r}"
            )
        return items

    def enabled_types(self) -> tuple[str, ...]:
        on = {
            "m": self.use_modality,
            "ta": self.use_task_aware,
            "ts": self.use_task_specific,
        }
        return tuple(kind for kind in self.prompt_order() if on[kind])

    def contrastive_enabled(self) -> bool:
        return self.use_task_aware and self.lam > 0


_USE_FLAG = {"m": "modality", "ta": "task_aware", "ts": "task_specific"}
assert set(OURS_OPTIONS) == {f.name for f in fields(OursOptions)}


def resolve_layers(options: OursOptions, num_layers: int) -> dict[str, tuple[int, ...]]:
    """The cross-modal layers each prompt type is attached to (disabled types: none).

    Types with explicit ``layers_<type>`` use those; the others take consecutive blocks of their
    depth, in ``order``, from the front or against the back.
    """
    enabled = options.enabled_types()
    explicit = {
        kind: getattr(options, f"layers_{kind}")
        for kind in enabled
        if getattr(options, f"layers_{kind}") is not None
    }
    depths = {kind: getattr(options, f"depth_{kind}") for kind in enabled if kind not in explicit}
    total = sum(depths.values())
    if total > num_layers:
        raise ConfigError(
            f"ours: the prompt types need {total} layers ("
            + ", ".join(f"depth_{k}={d}" for k, d in depths.items())
            + f") but the cross-modal transformers have {num_layers}; lower the depths or set "
            "layers_m/layers_ta/layers_ts"
        )
    start = 0 if options.placement == "front" else num_layers - total
    layers: dict[str, tuple[int, ...]] = {kind: () for kind in PROMPT_TYPES}
    for kind, depth in depths.items():
        layers[kind] = tuple(range(start, start + depth))
        start += depth
    for kind, chosen in explicit.items():
        if max(chosen) >= num_layers:
            raise ConfigError(
                f"ours: layers_{kind}={chosen} but the cross-modal transformers have "
                f"layers 0..{num_layers - 1}"
            )
        layers[kind] = tuple(chosen)
    return layers


# ------------------------------------------------------------------------------------------------
# Patterns and the contrastive loss
# ------------------------------------------------------------------------------------------------


def pattern_key(pattern: Pattern) -> str:
    """A parameter name for a pattern: "p" and its present bits in layout order, e.g. "p011"."""
    return "p" + "".join("1" if present else "0" for present in pattern)


def _code_map(modalities: tuple[str, ...]) -> dict[str, Pattern]:
    return {pattern_code(p, modalities): p for p in all_patterns(len(modalities))}


def positive_pairs(
    modalities: tuple[str, ...], spec: str = "swap"
) -> list[tuple[Pattern, Pattern]]:
    """The positive pairs of the contrastive loss.

    "swap": every pair of distinct patterns that swapping the first and the last modality of the
    layout maps onto each other, in ``all_patterns`` order. For (audio, video, text) that is
    method.md's audio<->text swap: [(v,t), (a,v)] and [(a), (t)]. Otherwise a comma list of
    code pairs such as "vt-av,a-t" (codes of the present modalities, any letter order).
    """
    patterns = all_patterns(len(modalities))
    if spec == "swap":
        pairs: list[tuple[Pattern, Pattern]] = []
        seen: set[frozenset[Pattern]] = set()
        for p in patterns:
            q = (p[-1], *p[1:-1], p[0]) if len(p) > 1 else p
            if q != p and frozenset((p, q)) not in seen:
                seen.add(frozenset((p, q)))
                pairs.append((p, q))
        return pairs
    by_code = _code_map(modalities)
    letters = "".join(short_name(m) for m in modalities)
    pairs = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        codes = [c.strip() for c in item.split("-")]
        if len(codes) != 2:
            raise ConfigError(
                f"ours: positive_pairs item {item!r} must be two codes joined by '-', e.g. 'vt-av'"
            )
        pair = []
        for code in codes:
            normal = "".join(sorted(code, key=letters.find))
            if normal not in by_code:
                raise ConfigError(
                    f"ours: positive_pairs: {code!r} is not a pattern; use one of "
                    f"{', '.join(by_code)}"
                )
            pair.append(by_code[normal])
        if pair[0] == pair[1]:
            raise ConfigError(f"ours: positive_pairs item {item!r} pairs a pattern with itself")
        pairs.append((pair[0], pair[1]))
    if not pairs:
        raise ConfigError(f"ours: positive_pairs {spec!r} names no pair; set lam=0 to disable")
    return pairs


def contrastive_task_loss(
    z: Mapping[Pattern, Tensor],
    tau: float,
    beta: float,
    pairs: Sequence[tuple[Pattern, Pattern]],
) -> Tensor:
    """method.md's L_con on the (d,) vectors ``z`` of every pattern.

    l(i, j) = -log( exp(sim(z_i, z_j)/tau) / sum_{k != i} exp(sim(z_i, z_k)/tau) ), sim = cosine,
    k over every pattern of ``z``. Each pair (i, j) contributes w * (l(i,j) + l(j,i)) / 2, with
    w = beta when both patterns have a single present modality and 1 otherwise; for the default
    pairs that is 1/2 (l(vt,av) + l(av,vt)) + beta * 1/2 (l(a,t) + l(t,a)).
    """
    patterns = list(z)
    if len(patterns) < 2:
        raise ConfigError("the contrastive loss needs at least two patterns")
    index = {p: i for i, p in enumerate(patterns)}
    stacked = F.normalize(torch.stack([z[p] for p in patterns]), dim=1)
    logits = stacked @ stacked.T / tau
    eye = torch.eye(len(patterns), dtype=torch.bool, device=logits.device)
    log_prob = logits - torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    total = logits.new_zeros(())
    for p, q in pairs:
        i, j = index[p], index[q]
        weight = beta if sum(p) == 1 and sum(q) == 1 else 1.0
        total = total + weight * 0.5 * (-log_prob[i, j] - log_prob[j, i])
    return total


# ------------------------------------------------------------------------------------------------
# The prompt module
# ------------------------------------------------------------------------------------------------


class OursPrompts(nn.Module):
    """All of the method's prompts and its ``prompt_for`` hook (see the module docstring)."""

    def __init__(
        self, modalities: Sequence[str], width: int, options: OursOptions, layers: dict[str, Any]
    ) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.width = width
        self.length = options.prompt_length
        self.order = options.prompt_order()
        self.layers = {kind: tuple(layers.get(kind, ())) for kind in PROMPT_TYPES}
        self.combine = options.task_aware_combine
        self.task_identity = options.task_identity
        self.patterns = all_patterns(len(self.modalities))
        self.pattern_index = {p: i for i, p in enumerate(self.patterns)}
        # presence bits (as a binary number, modality i = bit i) -> pattern index; -1: none.
        lookup = torch.full((2 ** len(self.modalities),), -1, dtype=torch.long)
        for i, p in enumerate(self.patterns):
            lookup[sum(1 << b for b, present in enumerate(p) if present)] = i
        self.register_buffer("_lookup", lookup, persistent=False)
        self.register_buffer(
            "_missing",
            torch.tensor([[0.0 if present else 1.0 for present in p] for p in self.patterns]),
            persistent=False,
        )
        # Set by the oracle plugin for the current minibatch: (B,) pattern indices.
        self.oracle_indices: Tensor | None = None
        self.unseen_rule = options.unseen_patterns
        # Patterns whose task-specific set has been (or is being) trained: a buffer, so that it
        # is in the state dict and survives a checkpoint and resume.
        self.register_buffer("seen", torch.zeros(len(self.patterns), dtype=torch.bool))
        self._routes: dict[tuple[bool, ...], Tensor] = {}
        # Per forward pass (see _batch_prompts); never copied, pickled or saved.
        self._batch_cache: _BatchPrompts | None = None
        # The seen flags as a tuple, read from the buffer once after each change rather than at
        # every step (reading a device tensor on the host would synchronise a GPU).
        self._seen_flags: tuple[bool, ...] | None = None

        std, shape = options.prompt_init_std, (self.length, width)
        # Parameters are created in a fixed order (modalities, keys, patterns in all_patterns
        # order), so the same seed gives the same prompts whatever the task order.
        self.modality = nn.ParameterDict()
        if options.use_modality or options.use_task_aware:
            for m in self.modalities:
                self.modality[m] = nn.Parameter(torch.randn(shape) * std)
        self.key_present: nn.Parameter | None = None
        self.key_missing: nn.Parameter | None = None
        if options.use_task_aware:
            self.key_present = nn.Parameter(torch.full((width,), options.key_init))
            self.key_missing = nn.Parameter(torch.full((width,), options.key_init))
        # trainable_head="pattern": filled by attach_pattern_heads once the backbone is known.
        self.head_weight = nn.ParameterDict()
        self.head_bias = nn.ParameterDict()
        self.task_specific = nn.ParameterDict()
        if options.use_task_specific:
            for p in self.patterns:
                self.task_specific[pattern_key(p)] = nn.Parameter(
                    torch.randn(len(self.modalities), *shape) * std
                )

    # --- per-pattern quantities ----------------------------------------------------------------

    def pattern_indices(self, presence: Tensor) -> Tensor:
        """(B,) index into ``self.patterns`` of each sample's presence mask (B, M)."""
        bits = (presence > 0.5).long()
        powers = 2 ** torch.arange(bits.shape[1], device=bits.device)
        index = self._lookup.to(bits.device)[(bits * powers).sum(dim=1)]
        # Checked on the device: no host synchronisation inside a training step.
        torch._assert_async(
            (index >= 0).all(), "a sample has every modality missing; no prompt set exists for it"
        )
        return index

    def sample_indices(self, ctx: PromptContext) -> Tensor:
        if self.task_identity == "oracle" and self.oracle_indices is not None:
            if self.oracle_indices.shape != (ctx.batch_size,):
                raise ConfigError(
                    f"oracle task identities for {tuple(self.oracle_indices.shape)} samples, "
                    f"batch has {ctx.batch_size}"
                )
            return self.oracle_indices.to(ctx.device)
        return self.pattern_indices(ctx.presence)

    def mark_seen(self, pattern: Pattern) -> None:
        self.seen[self.pattern_index[tuple(pattern)]] = True
        self._seen_flags = None

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._seen_flags = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_batch_cache"] = None
        return state

    def task_specific_indices(self, indices: Tensor) -> Tensor:
        """Each sample's task-specific set: its own pattern's, or under ``unseen_patterns=
        "nearest"`` the nearest seen pattern's when its own has not been trained."""
        return self.task_specific_routes().to(indices.device)[indices]

    def task_aware_all(self) -> Tensor:
        """(K, L or M*L, d): the task-aware prompt of every pattern (``self.patterns`` order)."""
        if self.key_present is None or self.key_missing is None:
            raise ConfigError("task-aware prompts are off (use_task_aware=false)")
        prompts = torch.stack([self.modality[m] for m in self.modalities])  # (M, L, d)
        missing = self._missing.to(prompts.device)[:, :, None]  # (K, M, 1)
        scale = missing * self.key_missing + (1 - missing) * self.key_present  # (K, M, d)
        masked = scale[:, :, None, :] * prompts[None]  # (K, M, L, d)
        if self.combine == "sum":
            return masked.sum(dim=1)
        return masked.flatten(1, 2)

    def task_specific_all(self) -> Tensor:
        """(K, M, L, d): every pattern's task-specific set."""
        return torch.stack([self.task_specific[pattern_key(p)] for p in self.patterns])

    def task_specific_set(self, pattern: Pattern) -> nn.Parameter:
        return self.task_specific[pattern_key(tuple(pattern))]

    def attach_pattern_heads(self, out_layer: nn.Linear) -> None:
        """trainable_head="pattern": a copy of ``out_layer`` per pattern (no random draw, so the
        prompts' initialisation is unchanged)."""
        for p in self.patterns:
            key = pattern_key(p)
            self.head_weight[key] = nn.Parameter(out_layer.weight.detach().clone())
            self.head_bias[key] = nn.Parameter(out_layer.bias.detach().clone())

    def pattern_head_parameters(self, pattern: Pattern | None = None) -> list[nn.Parameter]:
        """``pattern``'s output layer (every pattern's for None); empty without pattern heads."""
        if not self.head_weight:
            return []
        keys = list(self.head_weight) if pattern is None else [pattern_key(tuple(pattern))]
        return [q for key in keys for q in (self.head_weight[key], self.head_bias[key])]

    def pattern_head(self, hidden: Tensor, presence: Tensor) -> Tensor:
        """(B, output_dim): each sample's hidden vector through the output layer of the pattern
        its task-specific prompts come from (same route, so an unseen pattern borrows both)."""
        ctx = PromptContext(presence, self.modalities, hidden.shape[0], hidden.device)
        rows = self.task_specific_indices(self.sample_indices(ctx))
        weight = torch.stack([self.head_weight[pattern_key(p)] for p in self.patterns])
        bias = torch.stack([self.head_bias[pattern_key(p)] for p in self.patterns])
        return torch.einsum("bi,boi->bo", hidden, weight[rows]) + bias[rows]

    def task_specific_parameters(self, pattern: Pattern | None = None) -> list[nn.Parameter]:
        """The parameters behind ``pattern``'s task-specific set (all of them for None)."""
        if pattern is None:
            return [*self.task_specific.values(), *self.pattern_head_parameters()]
        key = pattern_key(tuple(pattern))
        own = [self.task_specific[key]] if key in self.task_specific else []
        return [*own, *self.pattern_head_parameters(pattern)]

    def trainable_for(self, pattern: Pattern) -> list[nn.Parameter]:
        """What training an experience of ``pattern`` may change among the task-specific
        parameters: its own set (and its output layer)."""
        return self.task_specific_parameters(pattern)

    def finished(self, pattern: Pattern) -> None:
        """Called after an experience of ``pattern``; per-pattern sets need no bookkeeping."""

    def pattern_summaries(self) -> dict[Pattern, Tensor]:
        """z_k: each pattern's task-aware prompt averaged over its length, (d,)."""
        task_aware = self.task_aware_all()
        return {p: task_aware[i].mean(dim=0) for i, p in enumerate(self.patterns)}

    # --- the hook ------------------------------------------------------------------------------

    def prompt_for(self, site: PromptSite, ctx: PromptContext) -> Tensor | IndexedPrompt | None:
        if not site.is_cross:
            return None
        kinds = tuple(kind for kind in self.order if site.layer in self.layers[kind])
        if not kinds:
            return None
        if site.width != self.width:
            raise ConfigError(f"prompts have width {self.width}, site {site.name} {site.width}")
        return self._batch_prompts(ctx).prompt(site.target, kinds)

    def _batch_prompts(self, ctx: PromptContext) -> _BatchPrompts:
        """This forward pass's prompts, computed at its first site and reused at the others
        (the backbone makes one context per pass)."""
        cached = self._batch_cache
        if (
            cached is None
            or cached.context is not ctx
            or cached.oracle_indices is not self.oracle_indices
        ):
            cached = _BatchPrompts(self, ctx)
            self._batch_cache = cached
        return cached

    def task_specific_routes(self) -> Tensor:
        """(K,) the pattern whose task-specific set each pattern uses (itself, or under
        ``unseen_patterns="nearest"`` the nearest seen pattern until its own is trained)."""
        if self._seen_flags is None:
            self._seen_flags = tuple(bool(v) for v in self.seen.tolist())
        seen = self._seen_flags
        if seen not in self._routes:
            trained = [p for p, s in zip(self.patterns, seen, strict=True) if s]
            route = range(len(self.patterns))
            if self.unseen_rule != "own" and any(seen) and not all(seen):
                route = [self.pattern_index[nearest_pattern(p, trained)] for p in self.patterns]
            self._routes[seen] = torch.tensor(list(route))
        return self._routes[seen]


class _BatchPrompts:
    """The prompts of one forward pass as K distinct rows (one per missing pattern) and each
    sample's pattern index, so the backbone projects each pattern's prompt once per batch."""

    def __init__(self, prompts: OursPrompts, ctx: PromptContext) -> None:
        self.context = ctx
        self.oracle_indices = prompts.oracle_indices
        self.owner = prompts
        self.index = prompts.sample_indices(ctx)
        self._per_kind: dict[str, Tensor] = {}
        self._tokens: dict[tuple[str, tuple[str, ...]], Tensor | IndexedPrompt] = {}

    def _rows(self, kind: str) -> Tensor:
        """(K, M or 1, P, d) for "ta" and "ts": every pattern's prompt of that kind."""
        if kind not in self._per_kind:
            owner = self.owner
            if kind == "ta":
                rows = owner.task_aware_all()[:, None]
            else:
                routes = owner.task_specific_routes().to(self.index.device)
                rows = owner.task_specific_all()[routes]
            self._per_kind[kind] = rows
        return self._per_kind[kind]

    def prompt(self, target: str, kinds: tuple[str, ...]) -> Tensor | IndexedPrompt:
        key = (target, kinds)
        if key not in self._tokens:
            owner = self.owner
            if kinds == ("m",):
                self._tokens[key] = owner.modality[target]
            else:
                branch = owner.modalities.index(target)
                count = len(owner.patterns)
                parts = []
                for kind in kinds:
                    if kind == "m":
                        parts.append(owner.modality[target].expand(count, -1, -1))
                    else:
                        rows = self._rows(kind)
                        parts.append(rows[:, branch if rows.shape[1] > 1 else 0])
                tokens = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
                self._tokens[key] = IndexedPrompt(tokens, self.index)
        return self._tokens[key]


class CompositionalPrompts(OursPrompts):
    """``task_specific_form="compositional"``: pattern k's task-specific set is
    sum_m C_m^(present or missing in k), each C (M branches, L, d); 2M components instead of
    2^M - 1 sets, so the parameters grow linearly in M and every pattern, seen in training or
    not, has a set."""

    def __init__(
        self, modalities: Sequence[str], width: int, options: OursOptions, layers: dict[str, Any]
    ) -> None:
        super().__init__(modalities, width, options, layers)
        self.update = options.compositional_update
        self.task_specific = nn.ParameterDict()
        if options.use_task_specific:
            m = len(self.modalities)
            # A sum of M components: each drawn with std/sqrt(M) so the set's scale matches
            # a per-pattern set's.
            std = options.prompt_init_std / math.sqrt(m)
            for modality in self.modalities:
                for state in ("present", "missing"):
                    self.task_specific[f"{modality}_{state}"] = nn.Parameter(
                        torch.randn(m, self.length, width) * std
                    )
        # Which components an earlier task trained ("unused" mode): a buffer, so it is in the
        # state dict and survives a checkpoint and resume.
        self.component_names = [
            f"{modality}_{state}"
            for modality in self.modalities
            for state in ("present", "missing")
        ]
        self.register_buffer("used", torch.zeros(len(self.component_names), dtype=torch.bool))

    def components(self, pattern: Pattern) -> list[str]:
        return [
            f"{modality}_{'present' if present else 'missing'}"
            for modality, present in zip(self.modalities, pattern, strict=True)
        ]

    def task_specific_all(self) -> Tensor:
        return torch.stack(
            [
                torch.stack([self.task_specific[c] for c in self.components(p)]).sum(dim=0)
                for p in self.patterns
            ]
        )

    def task_specific_set(self, pattern: Pattern) -> Tensor:  # type: ignore[override]
        return torch.stack([self.task_specific[c] for c in self.components(tuple(pattern))]).sum(0)

    def task_specific_parameters(self, pattern: Pattern | None = None) -> list[nn.Parameter]:
        heads = self.pattern_head_parameters(pattern)
        if pattern is None:
            return [*self.task_specific.values(), *heads]
        if not self.task_specific:
            return heads
        return [*(self.task_specific[c] for c in self.components(tuple(pattern))), *heads]

    def trainable_for(self, pattern: Pattern) -> list[nn.Parameter]:
        heads = self.pattern_head_parameters(pattern)
        if not self.task_specific:
            return heads
        names = self.components(tuple(pattern))
        if self.update == "unused":
            names = [c for c in names if not self.used[self.component_names.index(c)]]
        return [*(self.task_specific[c] for c in names), *heads]

    def finished(self, pattern: Pattern) -> None:
        if self.update == "unused":
            for name in self.components(tuple(pattern)):
                self.used[self.component_names.index(name)] = True


class PatternHeadModel(PromptedModel):
    """trainable_head="pattern": the prompted backbone up to its head's hidden vector, then the
    output layer of each sample's pattern instead of the frozen shared ``out_layer``."""

    prompts: OursPrompts

    def __init__(self, backbone: MulT, prompts: OursPrompts) -> None:
        super().__init__(backbone, prompts, "none")

    def forward(self, x: Tensor) -> Tensor:
        backbone = self.backbone
        with backbone.using_prompt_hook(self.prompts.prompt_for):
            features = backbone.forward_features(x)
        presence = backbone.layout.unpack(x)[1]
        output = self.prompts.pattern_head(backbone.head_hidden(features), presence)
        return backbone.squeeze_output(output)


# ------------------------------------------------------------------------------------------------
# Plugins
# ------------------------------------------------------------------------------------------------


def _supervised_plugin() -> type:
    from avalanche.core import SupervisedPlugin

    return SupervisedPlugin


def make_task_specific_selector(
    model: PromptedModel, prompts: OursPrompts, patterns: Sequence[Pattern], joint: bool
) -> Any:
    """A plugin: at ``before_training_exp`` only the experience's task-specific set trains.

    Experience i has pattern ``patterns[i]`` (the stream's order). The selector sets
    ``requires_grad`` (every set for joint training), then rebuilds the optimizer, because
    Avalanche builds it before plugins' ``before_training_exp``. After the experience, every
    method parameter is marked trainable again: outside training ``requires_grad`` marks the
    parameters the method trains over the whole stream (all prompts), which is what the runner
    counts as trainable; the backbone stays frozen throughout.
    """

    class TaskSpecificSelector(_supervised_plugin()):  # type: ignore[misc]
        # For checkpoints: ``current`` is None again after every experience, and requires_grad
        # is set afresh before the next one.
        stateless_between_experiences = True

        def __init__(self) -> None:
            super().__init__()
            self.current: Pattern | None = None

        def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            set_requires_grad(model.method_parameters(), True)
            trained_now = patterns if joint else [patterns[strategy.experience.current_experience]]
            for pattern in trained_now:
                prompts.mark_seen(pattern)
            if not joint:
                self.current = tuple(patterns[strategy.experience.current_experience])
                set_requires_grad(prompts.task_specific_parameters(), False)
                set_requires_grad(prompts.trainable_for(self.current), True)
            strategy.make_optimizer()

        def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            if self.current is not None:
                prompts.finished(self.current)
            self.current = None
            set_requires_grad(model.method_parameters(), True)

    return TaskSpecificSelector()


def make_contrastive_plugin(
    prompts: OursPrompts, options: OursOptions, pairs: Sequence[tuple[Pattern, Pattern]]
) -> Any:
    """A plugin adding lam * L_con to the loss of every training minibatch (``before_backward``).
    The z_k come from the shared parameters only, so no data of other tasks is needed."""

    class ContrastiveTaskLoss(_supervised_plugin()):  # type: ignore[misc]
        # For checkpoints: the loss comes from the prompts (in the model's state); last_value
        # only reports the last minibatch.
        stateless_between_experiences = True

        def __init__(self) -> None:
            super().__init__()
            self.last_value: Tensor | None = None

        def before_backward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            loss = contrastive_task_loss(
                prompts.pattern_summaries(), options.tau, options.beta, pairs
            )
            self.last_value = loss.detach()
            strategy.loss = strategy.loss + options.lam * loss

    return ContrastiveTaskLoss()


def make_oracle_plugin(prompts: OursPrompts, patterns: Sequence[Pattern]) -> Any:
    """A plugin giving each minibatch sample the pattern of its task (Avalanche's task label =
    the experience index in this stream) wherever Avalanche runs the model."""
    table = torch.tensor([prompts.pattern_index[tuple(p)] for p in patterns], dtype=torch.long)

    class OracleTaskIdentity(_supervised_plugin()):  # type: ignore[misc]
        # For checkpoints: the identities are cleared after every forward.
        stateless_between_experiences = True

        def _set(self, strategy: Any) -> None:
            labels = strategy.mb_task_id.long().cpu()
            prompts.oracle_indices = table[labels].to(strategy.device)

        def _clear(self, strategy: Any) -> None:
            prompts.oracle_indices = None

        def before_forward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            self._set(strategy)

        def after_forward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            self._clear(strategy)

        def before_eval_forward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            self._set(strategy)

        def after_eval_forward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            self._clear(strategy)

    return OracleTaskIdentity()


# ------------------------------------------------------------------------------------------------
# The strategies
# ------------------------------------------------------------------------------------------------


# Defaults changed by issue 18's study (old, new): stored runs made under the old default keep
# their keys and are never reused as runs of the new one (cmmm.running.changed_options).
CHANGED_DEFAULTS = {"trainable_head": ("none", OURS_OPTIONS["trainable_head"].default)}


@STRATEGIES.register(
    "ours",
    "The method: modality, task-aware and task-specific prompts on the frozen MulT, "
    "with the contrastive task loss",
    changed_options=CHANGED_DEFAULTS,
)
class Ours(Strategy):
    def __init__(self, **options: Any) -> None:
        super().__init__()
        self.config = OursOptions.from_options(options)
        self.resolved_layers: dict[str, tuple[int, ...]] | None = None
        self.model: PromptedModel | None = None
        self.prompts: OursPrompts | None = None
        self.plugins: list[Any] = []

    def options(self) -> dict[str, Any]:
        return asdict(self.config)

    def option_help(self) -> dict[str, str]:
        return {name: option.help for name, option in OURS_OPTIONS.items()}

    def build(self, ctx: StrategyContext) -> Any:
        backbone = ctx.model
        if not isinstance(backbone, MulT):
            raise ConfigError(f"ours needs the MulT backbone, got {type(backbone).__name__}")
        options = self.config
        width = backbone.config.d_model
        if options.prompt_dim is not None and options.prompt_dim != width:
            raise ConfigError(
                f"ours: prompt_dim={options.prompt_dim} but the model width d is {width}; the "
                "prompts are key/value tokens of width d (set prompt_dim to d or omit it)"
            )
        modalities = backbone.layout.modalities
        self.resolved_layers = resolve_layers(options, backbone.config.layers)
        pairs: list[tuple[Pattern, Pattern]] = []
        if options.contrastive_enabled():
            pairs = positive_pairs(modalities, options.positive_pairs)
        prompts_class = (
            CompositionalPrompts if options.task_specific_form == "compositional" else OursPrompts
        )
        prompts = prompts_class(modalities, width, options, self.resolved_layers)
        if options.trainable_head == PATTERN_HEAD:
            prompts.attach_pattern_heads(backbone.out_layer)
            model: PromptedModel = PatternHeadModel(backbone, prompts)
        else:
            model = PromptedModel(backbone, prompts, options.trainable_head)
        patterns = [tuple(task.pattern) for task in ctx.stream.tasks]
        plugins = [make_task_specific_selector(model, prompts, patterns, self.joint)]
        if pairs:
            plugins.append(make_contrastive_plugin(prompts, options, pairs))
        if options.task_identity == "oracle":
            plugins.append(make_oracle_plugin(prompts, patterns))
        self.model, self.prompts, self.plugins = model, prompts, plugins
        return make_prompt_template(model, ctx, joint=self.joint, plugins=plugins)


@STRATEGIES.register(
    "joint-ours",
    "Upperbound (ours): the method's prompts trained jointly on all tasks together",
    changed_options=CHANGED_DEFAULTS,
)
class JointOurs(Ours):
    joint = True


@STRATEGIES.register(
    "ours-compositional",
    "The method with task-specific prompts composed from per-modality present/missing "
    "components (2M instead of 2^M - 1 sets; not in the paper)",
)
class OursCompositional(Ours):
    def __init__(self, **options: Any) -> None:
        # A shared frozen head by default: per-pattern output layers would bring back the
        # 2^M - 1 growth the compositional form exists to avoid.
        super().__init__(
            **{
                "task_specific_form": "compositional",
                "unseen_patterns": "own",
                "trainable_head": "none",
                **options,
            }
        )
