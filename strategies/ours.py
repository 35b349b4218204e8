"""The method (method.md): modality-specific, task-aware and task-specific prompts on a frozen MulT,
with a contrastive loss between the task-aware prompts of missing patterns.

Two strategies share this file: ``ours`` (continual, one experience per missing pattern) and
``joint-ours`` (the paper's "Upperbound (ours)": the same prompts trained jointly on all tasks).
Every reconstructed choice of method.md is an option (``OURS_OPTIONS``) with method.md's default,
except the output layers (``trainable_head``, chosen on validation). What does not depend on these
prompts (each sample's pattern, the task-specific sets and which of them trains, per-pattern
output layers) is in ``cmmm.kit.pattern_prompts``; the compositional variant has its own file.

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

Everything is keyed by the pattern (the tuple of present flags), never by the task index, so a
permuted task order builds the same prompts and loss. L = L_task + lam * L_con, the contrastive
task loss (``contrastive_task_loss``) added by its plugin in ``before_backward``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmmm.data.patterns import Pattern, parse_pattern_pairs, swap_pairs
from cmmm.errors import ConfigError
from cmmm.kit.pattern_prompts import (
    TASK_IDENTITIES,
    UNSEEN_RULES,
    OracleTaskIdentity,
    PatternHeadModel,
    PatternPrompts,
    TaskSpecificSelector,
    assign_layers,
)
from cmmm.kit.prompt_kit import require_mult
from cmmm.options import Option, options_dataclass, parse_comma_list, parse_layers_or_auto
from cmmm.prompted_model import HEAD_CHOICES, PATTERN_HEAD, PromptedModel, make_prompt_template
from cmmm.strategy import STRATEGIES, Strategy, StrategyContext

PROMPT_TYPES = ("m", "ta", "ts")
PLACEMENTS = ("front", "back")
COMBINES = ("sum", "concat")
# The forms of cmmm.kit.pattern_prompts.TASK_SPECIFIC_STORES
# ("compositional": ours_compositional.py).
TASK_SPECIFIC_FORMS = ("per_pattern", "compositional")
COMPOSITIONAL_UPDATES = ("current", "unused")


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------


# One declaration per option: default, type, limits and the one-line help of `cmmm list
# strategies`; the OursOptions docstring has the detail. OursOptions' fields are made from it.
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
        parser=parse_layers_or_auto,
    ),
    "layers_ta": Option(
        None, list, "explicit layers of P_TA", nullable=True, parser=parse_layers_or_auto
    ),
    "layers_ts": Option(
        None, list, "explicit layers of P_TS", nullable=True, parser=parse_layers_or_auto
    ),
    "prompt_length": Option(16, int, "prompt length L in tokens (Figure 5)", minimum=1),
    "prompt_dim": Option(
        None, int, "prompt width; must equal the model width d (None: d)", minimum=1, nullable=True
    ),
    "prompt_init_std": Option(0.02, float, "std of the normal prompt initialisation", minimum=0),
    "key_init": Option(1.0, float, "initial value of the missing/present keys k- and k+"),
    "task_aware_combine": Option(
        "sum", str, "sum or concat of the masked P_m into P_TA", choices=COMBINES
    ),
    "tau": Option(0.5, float, "temperature of the contrastive task loss (> 0)"),
    "beta": Option(1.0, float, "weight of the single-modality positive pair (Table 4)", minimum=0),
    "lam": Option(
        0.1, float, "weight lambda of the contrastive loss; 0 turns it off (Table 4)", minimum=0
    ),
    "positive_pairs": Option(
        "swap", str, "'swap' (audio<->text) or code pairs like 'vt-av,a-t'", parser=parse_comma_list
    ),
    "trainable_head": Option(
        PATTERN_HEAD,
        str,
        "pattern (default: chosen on mfeat validation, +10 AA at FM ~0 and 3 % trainable): one "
        "output layer per missing pattern, trained with its task-specific set; none, out or "
        "all: which shared head layers train besides the prompts",
        choices=HEAD_CHOICES,
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


@options_dataclass(OURS_OPTIONS)
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

    ``trainable_head`` (method.md is silent): "pattern" (default since issue 18's study; not in
    the paper) gives each missing pattern its own copy of ``out_layer``, trained with its
    task-specific set, so it cannot forget (``cmmm.kit.pattern_prompts``); "none" (the paper's
    prompts only), "out" or "all" train shared head layers, which every task moves.

    ``task_identity`` (``OracleTaskIdentity``), ``unseen_patterns`` (``PatternPrompts.
    task_specific_routes``) and ``task_specific_form`` (``TASK_SPECIFIC_STORES``; "compositional"
    and its ``compositional_update`` are ``strategies/ours_compositional.py``) are described where
    they are implemented, in ``cmmm.kit.pattern_prompts`` unless said otherwise.

    ``positive_pairs``: "swap" (default) = the pairs of patterns related by swapping the first and
    the last modality of the layout, which for (audio, video, text) is method.md's audio<->text
    swap: {v,t}<->{a,v} and {a}<->{t}. Or an explicit list of code pairs, e.g. "vt-av,a-t" (Table
    4's ablations: "a-t" or "vt-av" alone). A pair of single-modality patterns is weighted by
    ``beta``, any other pair by 1. ``lam`` = 0 turns the loss off; so does
    ``use_task_aware=false`` (the loss is defined on the task-aware prompts).
    """

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
        on = {"m": self.use_modality, "ta": self.use_task_aware, "ts": self.use_task_specific}
        return tuple(kind for kind in self.prompt_order() if on[kind])

    def contrastive_enabled(self) -> bool:
        return self.use_task_aware and self.lam > 0


_USE_FLAG = {"m": "modality", "ta": "task_aware", "ts": "task_specific"}


def resolve_layers(options: OursOptions, num_layers: int) -> dict[str, tuple[int, ...]]:
    """The cross-modal layers each prompt type is attached to (disabled types: none).

    Types with explicit ``layers_<type>`` use those; the others take consecutive blocks of their
    depth, in ``order``, from the front or against the back.
    """
    enabled = options.enabled_types()
    explicit = {k: v for k in enabled if (v := getattr(options, f"layers_{k}")) is not None}
    depths = {kind: getattr(options, f"depth_{kind}") for kind in enabled if kind not in explicit}
    return assign_layers("ours", PROMPT_TYPES, depths, explicit, options.placement, num_layers)


# ------------------------------------------------------------------------------------------------
# The contrastive loss
# ------------------------------------------------------------------------------------------------


def positive_pairs(
    modalities: tuple[str, ...], spec: str = "swap"
) -> list[tuple[Pattern, Pattern]]:
    """The positive pairs of the contrastive loss: "swap" (``swap_pairs``; for (audio, video,
    text) method.md's audio<->text swap) or code pairs such as "vt-av,a-t"."""
    if spec == "swap":
        return swap_pairs(len(modalities))
    pairs = parse_pattern_pairs(spec, modalities, "ours: positive_pairs")
    if not pairs:
        raise ConfigError(f"ours: positive_pairs {spec!r} names no pair; set lam=0 to disable")
    return pairs


def contrastive_task_loss(
    z: Mapping[Pattern, Tensor], tau: float, beta: float, pairs: Sequence[tuple[Pattern, Pattern]]
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


class OursPrompts(PatternPrompts):
    """All of the method's prompts (see the module docstring): P_m ("m", shared by every sample),
    the task-aware prompt ("ta") and the task-specific sets ("ts", held by the store of
    ``task_specific_form``), the last two one row per missing pattern."""

    def __init__(
        self, modalities: Sequence[str], width: int, options: OursOptions, layers: dict[str, Any]
    ) -> None:
        super().__init__(modalities, width, options, options.prompt_order(), layers)
        self.combine = options.task_aware_combine
        self.register_buffer(
            "_missing",
            torch.tensor([[0.0 if present else 1.0 for present in p] for p in self.patterns]),
            persistent=False,
        )
        # Parameters are created in a fixed order (modalities, keys, patterns in all_patterns
        # order), so the same seed gives the same prompts whatever the task order.
        self.modality = nn.ParameterDict()
        if options.use_modality or options.use_task_aware:
            for m in self.modalities:
                self.modality[m] = nn.Parameter(
                    torch.randn(self.length, width) * options.prompt_init_std
                )
        self.key_present: nn.Parameter | None = None
        self.key_missing: nn.Parameter | None = None
        if options.use_task_aware:
            self.key_present = nn.Parameter(torch.full((width,), options.key_init))
            self.key_missing = nn.Parameter(torch.full((width,), options.key_init))
        self.add_task_specific(options)

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

    def pattern_summaries(self) -> dict[Pattern, Tensor]:
        """z_k: each pattern's task-aware prompt averaged over its length, (d,)."""
        task_aware = self.task_aware_all()
        return {p: task_aware[i].mean(dim=0) for i, p in enumerate(self.patterns)}

    def shared_prompt(self, kind: str, target: str) -> Tensor | None:
        return self.modality[target] if kind == "m" else None

    def pattern_rows(self, kind: str, device: torch.device) -> Tensor:
        if kind == "ta":
            return self.task_aware_all()[:, None]
        return self.routed_task_specific(device)


class ContrastiveTaskLoss:
    """A plugin adding lam * L_con to the loss of every training minibatch (``before_backward``).
    The z_k come from the shared parameters only, so no data of other tasks is needed. A plain
    class: see the plugins of ``cmmm.kit.pattern_prompts``."""

    # For checkpoints: the loss comes from the prompts (in the model's state); last_value only
    # reports the last minibatch. Its name when it was made inside a function: see former_names
    # in cmmm.template_state.
    stateless_between_experiences = True
    former_names = ("strategies.ours.make_contrastive_plugin.<locals>.ContrastiveTaskLoss",)

    def __init__(
        self, prompts: OursPrompts, options: OursOptions, pairs: Sequence[tuple[Pattern, Pattern]]
    ) -> None:
        self.prompts, self.options, self.pairs = prompts, options, list(pairs)
        self.last_value: Tensor | None = None

    def before_backward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        options = self.options
        loss = contrastive_task_loss(
            self.prompts.pattern_summaries(), options.tau, options.beta, self.pairs
        )
        self.last_value = loss.detach()
        strategy.loss = strategy.loss + options.lam * loss


# --- The strategies -----------------------------------------------------------------------------

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
        backbone = require_mult("ours", ctx.model)
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
        prompts = OursPrompts(modalities, width, options, self.resolved_layers)
        if options.trainable_head == PATTERN_HEAD:
            prompts.attach_pattern_heads(backbone.out_layer)
            model: PromptedModel = PatternHeadModel(backbone, prompts)
        else:
            model = PromptedModel(backbone, prompts, options.trainable_head)
        patterns = [tuple(task.pattern) for task in ctx.stream.tasks]
        plugins: list[Any] = [TaskSpecificSelector(model, prompts, patterns, self.joint)]
        if pairs:
            plugins.append(ContrastiveTaskLoss(prompts, options, pairs))
        if options.task_identity == "oracle":
            plugins.append(OracleTaskIdentity(prompts, patterns))
        self.model, self.prompts, self.plugins = model, prompts, plugins
        return make_prompt_template(model, ctx, joint=self.joint, plugins=plugins)


@STRATEGIES.register(
    "joint-ours",
    "Upperbound (ours): the method's prompts trained jointly on all tasks together",
    changed_options=CHANGED_DEFAULTS,
)
class JointOurs(Ours):
    joint = True
