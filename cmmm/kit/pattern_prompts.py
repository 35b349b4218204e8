"""Prompts chosen per sample by its missing pattern: what the method (``ours``) and its variants
share, so that each variant is its own file and no strategy imports another.

* ``pattern_key`` (a pattern's parameter name) and ``assign_layers`` (prompt kinds to cross-modal
  layers by order, depth and placement).
* ``PatternPrompts``, the base of the method's prompt module: the patterns of the layout and each
  sample's pattern (from its presence mask, or the task label under ``task_identity="oracle"``),
  which patterns have been trained (``seen``) and which set an untrained one borrows, the
  task-specific sets (through a ``TaskSpecificStore``), one output layer per pattern
  (``trainable_head="pattern"``) and the backbone's prompt hook. A subclass adds its own kinds of
  prompt: a kind is either shared by every sample (one prompt per branch) or one row per
  pattern, indexed per sample (``PatternBatch``).
* ``TaskSpecificStore`` and ``TASK_SPECIFIC_STORES``: how the task-specific sets are held, by the
  value of the ``task_specific_form`` option. The core holds "per_pattern" (method.md: one set per
  missing case); plug-ins register the others.
* ``PatternHeadModel`` and the plugins ``TaskSpecificSelector`` (which sets train in which
  experience) and ``OracleTaskIdentity``. The plugins are plain classes: Avalanche calls a
  plugin's callbacks by name (``trigger_plugins``), and inheriting ``SupervisedPlugin`` would
  import Avalanche whenever the strategies are merely listed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from cmmm.backbone import IndexedPrompt, MulT, PromptContext, PromptSite
from cmmm.data.patterns import Pattern, all_patterns, nearest_pattern
from cmmm.errors import ConfigError
from cmmm.kit.pattern_lookup import pattern_indices, pattern_lookup
from cmmm.prompted_model import PromptedModel, set_requires_grad
from cmmm.registry import Registry

TASK_IDENTITIES = ("pattern", "oracle")
UNSEEN_RULES = ("nearest", "own")


def pattern_key(pattern: Pattern) -> str:
    """A parameter name for a pattern: "p" and its present bits in layout order, e.g. "p011"."""
    return "p" + "".join("1" if present else "0" for present in pattern)


def assign_layers(
    owner: str,
    kinds: Sequence[str],
    depths: Mapping[str, int],
    explicit: Mapping[str, Sequence[int]],
    placement: str,
    num_layers: int,
) -> dict[str, tuple[int, ...]]:
    """The cross-modal layers of every prompt kind of ``kinds`` (none for a kind in neither map).

    Kinds in ``explicit`` take those layers; the kinds of ``depths``, in its order, take
    consecutive blocks of their depth from the first layer (``placement`` "front") or against
    the last one ("back").
    """
    total = sum(depths.values())
    if total > num_layers:
        raise ConfigError(
            f"{owner}: the prompt types need {total} layers ("
            + ", ".join(f"depth_{k}={d}" for k, d in depths.items())
            + f") but the cross-modal transformers have {num_layers}; lower the depths or set "
            + "/".join(f"layers_{k}" for k in kinds)
        )
    start = 0 if placement == "front" else num_layers - total
    layers: dict[str, tuple[int, ...]] = {kind: () for kind in kinds}
    for kind, depth in depths.items():
        layers[kind] = tuple(range(start, start + depth))
        start += depth
    for kind, chosen in explicit.items():
        if max(chosen) >= num_layers:
            raise ConfigError(
                f"{owner}: layers_{kind}={chosen} but the cross-modal transformers have "
                f"layers 0..{num_layers - 1}"
            )
        layers[kind] = tuple(chosen)
    return layers


# ------------------------------------------------------------------------------------------------
# Task-specific sets
# ------------------------------------------------------------------------------------------------


class TaskSpecificStore(Protocol):
    """How a ``PatternPrompts`` holds the task-specific sets of the missing patterns.

    A store keeps its parameters in its prompt module's ``task_specific`` ParameterDict and any
    bookkeeping in buffers of that module, so that the state-dict keys read
    ``prompts.task_specific.<name>`` and ``prompts.<buffer>`` whatever the form.
    """

    def all_sets(self) -> Tensor:
        """(K, M, L, d): every pattern's set, in ``prompts.patterns`` order."""
        ...

    def set_of(self, pattern: Pattern) -> Tensor: ...

    def parameters_of(self, pattern: Pattern | None = None) -> list[nn.Parameter]:
        """The parameters behind ``pattern``'s set (every set's for None)."""
        ...

    def trainable_for(self, pattern: Pattern) -> list[nn.Parameter]:
        """Those of them that training an experience of ``pattern`` may change."""
        ...

    def finished(self, pattern: Pattern) -> None:
        """Called after an experience of ``pattern``."""
        ...


class PatternOptions(Protocol):
    """What the core reads of a method's options (``OursOptions``); a store may read more."""

    prompt_length: int
    prompt_init_std: float
    use_task_specific: bool
    task_specific_form: str
    task_identity: str
    unseen_patterns: str


# A store is made from its prompt module (whose ``task_specific`` is still empty) and the options.
StoreFactory = Callable[["PatternPrompts", Any], TaskSpecificStore]
TASK_SPECIFIC_STORES: Registry[StoreFactory] = Registry("task-specific form", discover=True)


@TASK_SPECIFIC_STORES.register("per_pattern", "one set per missing case, 2^M - 1 sets (method.md)")
class PerPatternStore:
    """One set (M branches, L, d) per missing pattern (method.md, so 2^M - 1 sets):
    ``task_specific.p011`` etc."""

    def __init__(self, prompts: PatternPrompts, options: PatternOptions) -> None:
        self.prompts = prompts
        if options.use_task_specific:
            shape = (len(prompts.modalities), prompts.length, prompts.width)
            for p in prompts.patterns:
                prompts.task_specific[pattern_key(p)] = nn.Parameter(
                    torch.randn(shape) * options.prompt_init_std
                )

    def all_sets(self) -> Tensor:
        sets = self.prompts.task_specific
        return torch.stack([sets[pattern_key(p)] for p in self.prompts.patterns])

    def set_of(self, pattern: Pattern) -> Tensor:
        return self.prompts.task_specific[pattern_key(tuple(pattern))]

    def parameters_of(self, pattern: Pattern | None = None) -> list[nn.Parameter]:
        sets = self.prompts.task_specific
        if pattern is None:
            return list(sets.values())
        key = pattern_key(tuple(pattern))
        return [sets[key]] if key in sets else []

    def trainable_for(self, pattern: Pattern) -> list[nn.Parameter]:
        return self.parameters_of(pattern)

    def finished(self, pattern: Pattern) -> None:
        """Per-pattern sets need no bookkeeping."""


# ------------------------------------------------------------------------------------------------
# The prompt module
# ------------------------------------------------------------------------------------------------


class PatternPrompts(nn.Module):
    """The base of a prompt module whose prompts are chosen per sample by its missing pattern.

    A subclass calls ``__init__``, creates its own prompts, then ``add_task_specific`` (so that
    the parameters keep one creation order and the same seed gives the same prompts), and
    implements ``shared_prompt`` and ``pattern_rows`` for its kinds of prompt (``order``).
    """

    def __init__(
        self,
        modalities: Sequence[str],
        width: int,
        options: PatternOptions,
        order: Sequence[str],
        layers: Mapping[str, Sequence[int]],
    ) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.width = width
        self.length = options.prompt_length
        self.order = tuple(order)
        self.layers = {kind: tuple(layers.get(kind, ())) for kind in self.order}
        self.task_identity = options.task_identity
        self.unseen_rule = options.unseen_patterns
        self.patterns = all_patterns(len(self.modalities))
        self.pattern_index = {p: i for i, p in enumerate(self.patterns)}
        lookup = pattern_lookup(self.patterns, len(self.modalities))
        self.register_buffer("_lookup", lookup, persistent=False)
        # Set by the oracle plugin for the current minibatch: (B,) pattern indices.
        self.oracle_indices: Tensor | None = None
        # Patterns whose task-specific set has been (or is being) trained: a buffer, so that it
        # is in the state dict and survives a checkpoint and resume.
        self.register_buffer("seen", torch.zeros(len(self.patterns), dtype=torch.bool))
        self._routes: dict[tuple[bool, ...], Tensor] = {}
        # Per forward pass (see _batch_prompts); never copied, pickled or saved.
        self._batch_cache: PatternBatch | None = None
        # The seen flags as a tuple, read from the buffer once after each change rather than at
        # every step (reading a device tensor on the host would synchronise a GPU).
        self._seen_flags: tuple[bool, ...] | None = None

    def add_task_specific(self, options: PatternOptions) -> None:
        """The task-specific sets (the store of ``options.task_specific_form``) and the
        per-pattern output layers (empty until ``attach_pattern_heads``)."""
        self.head_weight = nn.ParameterDict()
        self.head_bias = nn.ParameterDict()
        self.task_specific = nn.ParameterDict()
        form = TASK_SPECIFIC_STORES.get(options.task_specific_form)
        self.store: TaskSpecificStore = form.factory(self, options)

    # --- each sample's pattern -----------------------------------------------------------------

    def pattern_indices(self, presence: Tensor) -> Tensor:
        """(B,) index into ``self.patterns`` of each sample's presence mask (B, M)."""
        message = "a sample has every modality missing; no prompt set exists for it"
        return pattern_indices(self._lookup, presence, message)

    def sample_indices(self, ctx: PromptContext) -> Tensor:
        if self.task_identity == "oracle" and self.oracle_indices is not None:
            if self.oracle_indices.shape != (ctx.batch_size,):
                raise ConfigError(
                    f"oracle task identities for {tuple(self.oracle_indices.shape)} samples, "
                    f"batch has {ctx.batch_size}"
                )
            return self.oracle_indices.to(ctx.device)
        return self.pattern_indices(ctx.presence)

    # --- trained patterns and the sets of untrained ones ---------------------------------------

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

    def task_specific_routes(self) -> Tensor:
        """(K,) the pattern whose task-specific set each pattern uses.

        ``unseen_patterns`` says which set a sample gets whose pattern no task has trained yet (a
        held-out pattern of ``--eval-patterns``, or a later task's before its turn). "nearest"
        (default for per-pattern sets; not in the paper): the set of the nearest trained pattern
        (``cmmm.data.patterns.nearest_pattern``: fewest differing modalities, then most shared
        present ones), since an untrained set is only its random initialisation. "own": the
        pattern's own set, which for the compositional form is composed from trained components
        (that strategy's default).
        """
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

    def task_specific_indices(self, indices: Tensor) -> Tensor:
        """Each sample's task-specific set: its own pattern's, or under ``unseen_patterns=
        "nearest"`` the nearest seen pattern's when its own has not been trained."""
        return self.task_specific_routes().to(indices.device)[indices]

    # --- task-specific sets and output layers --------------------------------------------------

    def task_specific_all(self) -> Tensor:
        """(K, M, L, d): every pattern's task-specific set."""
        return self.store.all_sets()

    def routed_task_specific(self, device: torch.device) -> Tensor:
        """(K, M, L, d): the set each pattern uses (``task_specific_routes``)."""
        return self.task_specific_all()[self.task_specific_routes().to(device)]

    def task_specific_set(self, pattern: Pattern) -> Tensor:
        return self.store.set_of(pattern)

    def task_specific_parameters(self, pattern: Pattern | None = None) -> list[nn.Parameter]:
        """The parameters behind ``pattern``'s task-specific set and its output layer (every
        pattern's for None)."""
        return [*self.store.parameters_of(pattern), *self.pattern_head_parameters(pattern)]

    def trainable_for(self, pattern: Pattern) -> list[nn.Parameter]:
        """What training an experience of ``pattern`` may change among the task-specific
        parameters: what its store allows of its set, and its output layer."""
        return [*self.store.trainable_for(pattern), *self.pattern_head_parameters(pattern)]

    def finished(self, pattern: Pattern) -> None:
        self.store.finished(pattern)

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

    # --- the hook ------------------------------------------------------------------------------

    def shared_prompt(self, kind: str, target: str) -> Tensor | None:
        """(P, d): the prompt of ``kind`` every sample gets on the branch of ``target``; None for
        a kind that is per pattern."""
        return None

    def pattern_rows(self, kind: str, device: torch.device) -> Tensor:
        """(K, M or 1, P, d): every pattern's prompt of a per-pattern ``kind``, per branch (M) or
        the same for every branch (1)."""
        raise NotImplementedError

    def prompt_for(self, site: PromptSite, ctx: PromptContext) -> Tensor | IndexedPrompt | None:
        if not site.is_cross:
            return None
        kinds = tuple(kind for kind in self.order if site.layer in self.layers[kind])
        if not kinds:
            return None
        if site.width != self.width:
            raise ConfigError(f"prompts have width {self.width}, site {site.name} {site.width}")
        return self._batch_prompts(ctx).prompt(site.target, kinds)

    def _batch_prompts(self, ctx: PromptContext) -> PatternBatch:
        """This forward pass's prompts, computed at its first site and reused at the others
        (the backbone makes one context per pass)."""
        cached = self._batch_cache
        if (
            cached is None
            or cached.context is not ctx
            or cached.oracle_indices is not self.oracle_indices
        ):
            cached = PatternBatch(self, ctx)
            self._batch_cache = cached
        return cached


class PatternBatch:
    """The prompts of one forward pass as K distinct rows (one per missing pattern) and each
    sample's pattern index, so the backbone projects each pattern's prompt once per batch."""

    def __init__(self, prompts: PatternPrompts, ctx: PromptContext) -> None:
        self.context = ctx
        self.oracle_indices = prompts.oracle_indices
        self.owner = prompts
        self.index = prompts.sample_indices(ctx)
        self._per_kind: dict[str, Tensor] = {}
        self._tokens: dict[tuple[str, tuple[str, ...]], Tensor | IndexedPrompt] = {}

    def _rows(self, kind: str) -> Tensor:
        if kind not in self._per_kind:
            self._per_kind[kind] = self.owner.pattern_rows(kind, self.index.device)
        return self._per_kind[kind]

    def prompt(self, target: str, kinds: tuple[str, ...]) -> Tensor | IndexedPrompt:
        key = (target, kinds)
        if key not in self._tokens:
            owner = self.owner
            shared = owner.shared_prompt(kinds[0], target) if len(kinds) == 1 else None
            if shared is not None:
                self._tokens[key] = shared
            else:
                branch = owner.modalities.index(target)
                count = len(owner.patterns)
                parts = []
                for kind in kinds:
                    shared = owner.shared_prompt(kind, target)
                    if shared is not None:
                        parts.append(shared.expand(count, -1, -1))
                    else:
                        rows = self._rows(kind)
                        parts.append(rows[:, branch if rows.shape[1] > 1 else 0])
                tokens = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
                self._tokens[key] = IndexedPrompt(tokens, self.index)
        return self._tokens[key]


class PatternHeadModel(PromptedModel):
    """trainable_head="pattern" (not in the paper): the prompted backbone up to its head's hidden
    vector, then the output layer of each sample's pattern instead of the frozen shared
    ``out_layer``. Every missing pattern has its own copy of the pre-trained ``out_layer``, part of
    that pattern's task-specific set: it trains only in its pattern's experience, so it cannot
    forget, and a sample reads the output layer its task-specific prompts come from."""

    prompts: PatternPrompts

    def __init__(self, backbone: MulT, prompts: PatternPrompts) -> None:
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


class TaskSpecificSelector:
    """At ``before_training_exp`` only the experience's task-specific set trains.

    Experience i has pattern ``patterns[i]`` (the stream's order). The selector sets
    ``requires_grad`` (every set for joint training), then rebuilds the optimizer, because
    Avalanche builds it before plugins' ``before_training_exp``. After the experience, every
    method parameter is marked trainable again: outside training ``requires_grad`` marks the
    parameters the method trains over the whole stream (all prompts), which is what the runner
    counts as trainable; the backbone stays frozen throughout.
    """

    # For checkpoints: ``current`` is None again after every experience, and requires_grad is set
    # afresh before the next one.
    stateless_between_experiences = True
    # Its names when strategies/ours.py made it and before the method kit moved into cmmm/kit
    # (checkpoints written then still resume).
    former_names = (
        "strategies.ours.make_task_specific_selector.<locals>.TaskSpecificSelector",
        "cmmm.pattern_prompts.TaskSpecificSelector",
    )

    def __init__(
        self,
        model: PromptedModel,
        prompts: PatternPrompts,
        patterns: Sequence[Pattern],
        joint: bool,
    ) -> None:
        self.model = model
        self.prompts = prompts
        self.patterns = list(patterns)
        self.joint = joint
        self.current: Pattern | None = None

    def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        prompts, patterns = self.prompts, self.patterns
        set_requires_grad(self.model.method_parameters(), True)
        trained_now = patterns if self.joint else [patterns[strategy.experience.current_experience]]
        for pattern in trained_now:
            prompts.mark_seen(pattern)
        if not self.joint:
            self.current = tuple(trained_now[0])
            set_requires_grad(prompts.task_specific_parameters(), False)
            set_requires_grad(prompts.trainable_for(self.current), True)
        strategy.make_optimizer()

    def after_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        if self.current is not None:
            self.prompts.finished(self.current)
        self.current = None
        set_requires_grad(self.model.method_parameters(), True)


class OracleTaskIdentity:
    """task_identity="oracle": gives each minibatch sample the pattern of its task (Avalanche's
    task label = the experience index in this stream) wherever Avalanche runs the model.

    "pattern" (the default) selects each sample's task-specific prompts and its task-aware mask
    from the sample's own presence mask. "oracle" uses the pattern of the task the stream says the
    sample belongs to, i.e. in training. The runner's evaluator passes no task labels, so at test
    time "oracle" reads the presence mask too; on these streams every sample of a task carries
    exactly that task's pattern, so the two coincide (tests/test_strategies/test_ours.py checks it).
    """

    # For checkpoints: the identities are cleared after every forward.
    stateless_between_experiences = True
    former_names = (
        "strategies.ours.make_oracle_plugin.<locals>.OracleTaskIdentity",
        "cmmm.pattern_prompts.OracleTaskIdentity",
    )

    def __init__(self, prompts: PatternPrompts, patterns: Sequence[Pattern]) -> None:
        self.prompts = prompts
        self.table = torch.tensor(
            [prompts.pattern_index[tuple(p)] for p in patterns], dtype=torch.long
        )

    def _set(self, strategy: Any) -> None:
        labels = strategy.mb_task_id.long()
        if self.table.device != labels.device:
            # Moved once (the plugin is not checkpointed), so that a step on CUDA indexes on the
            # device instead of copying the task ids to the host and back.
            self.table = self.table.to(labels.device)
        self.prompts.oracle_indices = self.table[labels]

    def _clear(self, strategy: Any) -> None:
        self.prompts.oracle_indices = None

    def before_forward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._set(strategy)

    def after_forward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._clear(strategy)

    def before_eval_forward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._set(strategy)

    def after_eval_forward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        self._clear(strategy)
