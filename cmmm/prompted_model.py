"""The piece every prompt method shares: a frozen backbone wrapped with a trainable prompt module.

``PromptedModel`` owns an unchanged MulT (``self.backbone``, every weight frozen) and a prompt
module (``self.prompts``, an ``nn.Module`` with ``prompt_for(site, ctx)``). Its ``forward`` calls
``prepare(x)``, the one step a method overrides (compute the batch's prompts into
``prompts.current``, return the input the backbone runs on), runs the backbone on it with
``prompts.prompt_for`` as the backbone's prompt hook (see ``cmmm.backbone``), and clears
``prompts.current`` again, whatever happens. The prompts are ordinary registered parameters of
the wrapper: they appear in ``parameters()`` and ``state_dict()``, and move with ``.to()``.
(Setting a module as the backbone's hook would not register it: ``MulT`` deliberately keeps its
hook out of its submodules.) The backbone keeps its normal train/eval behaviour (dropout on in
training, off in evaluation); only its weights are frozen.

``make_prompt_template`` builds the Avalanche template for such a model. Its optimizer holds only
the parameters with ``requires_grad`` and is built afresh at every experience. Why:

* Avalanche's default ``make_optimizer`` puts every model parameter into the optimizer (frozen
  backbone included) and keeps the Adam state across experiences.
* A parameter that trained in an earlier experience (an old task's task-specific prompts) and is
  frozen now would keep its Adam moments. As long as its gradient is ``None`` Adam skips it, but a
  zero gradient (``zero_grad(set_to_none=False)``, or a plugin that fills gradients) makes Adam
  move it with the old momentum: old tasks' prompts would drift without ever being trained.
* A fresh Adam over exactly the trainable parameters rules both out: frozen weights never enter
  the optimizer, and no state survives from one experience to the next. Prompt methods that
  switch which parameters train per experience must change ``requires_grad`` first and then call
  ``strategy.make_optimizer()`` again (Avalanche calls ``make_optimizer`` before plugins'
  ``before_training_exp``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from cmmm.backbone import MulT, PromptContext, PromptSite
from cmmm.errors import ConfigError
from cmmm.optimizers import adam
from cmmm.strategy import StrategyContext

# Which of MulT's head layers train, by option value.
TRAINABLE_HEADS: dict[str, tuple[str, ...]] = {
    "none": (),
    "out": ("out_layer",),
    "all": ("proj1", "proj2", "out_layer"),
}
# trainable_head="pattern": one copy of ``out_layer`` per missing pattern (see ``PatternOutputs``).
PATTERN_HEAD = "pattern"
# Every value a prompt method's ``trainable_head`` option accepts.
HEAD_CHOICES: tuple[str, ...] = (*TRAINABLE_HEADS, PATTERN_HEAD)


class PromptModule(Protocol):
    """What ``PromptedModel`` needs of its prompt module (which must also be an ``nn.Module``)."""

    def prompt_for(self, site: PromptSite, ctx: PromptContext) -> Tensor | None: ...


def set_requires_grad(parameters: Iterable[nn.Parameter], flag: bool) -> None:
    """Set ``requires_grad``; a parameter that stops training also loses any stale gradient."""
    for p in parameters:
        p.requires_grad_(flag)
        if not flag:
            p.grad = None


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class PatternOutputs(nn.Module):
    """One trainable copy of the frozen ``out_layer`` per missing pattern; a sample reads the copy
    of its own pattern (which modalities its input has, visible at test time too).

    The copies start equal to the pre-trained layer, so the model's first prediction is the
    frozen model's. Each experience has one pattern, so only that pattern's copy gets a non-zero
    gradient; with the fresh Adam of every experience (module docstring), the other copies stay
    exactly as they were: an output layer per pattern cannot be overwritten by a later pattern.
    Rows are indexed by ``sum(present_j * 2**j) - 1`` over the M modalities (2^M - 1 patterns).
    """

    def __init__(self, out_layer: nn.Linear, num_modalities: int) -> None:
        super().__init__()
        patterns = 2**num_modalities - 1
        self.weight = nn.Parameter(out_layer.weight.detach().clone().repeat(patterns, 1, 1))
        self.bias = nn.Parameter(out_layer.bias.detach().clone().repeat(patterns, 1))
        self.register_buffer("bits", 2 ** torch.arange(num_modalities), persistent=False)

    def rows(self, presence: Tensor) -> Tensor:
        """(B,) the pattern row of each sample from its (B, M) presence mask."""
        return (presence.long() * self.bits.to(presence.device)).sum(dim=1) - 1

    def forward(self, hidden: Tensor, presence: Tensor) -> Tensor:
        rows = self.rows(presence)
        return torch.einsum("bi,boi->bo", hidden, self.weight[rows]) + self.bias[rows]


class PromptedModel(nn.Module):
    """A frozen ``MulT`` run with the prompts of ``prompts`` (see the module docstring).

    ``trainable_head``: "none" (default, only prompts train), "out" (also ``out_layer``), "all"
    (also ``proj1`` and ``proj2``) or "pattern" (``PatternOutputs``: a copy of ``out_layer`` per
    missing pattern replaces the frozen one's output). The backbone is frozen in place.
    """

    def __init__(self, backbone: MulT, prompts: nn.Module, trainable_head: str = "none") -> None:
        super().__init__()
        if not isinstance(backbone, MulT):
            raise ConfigError(
                f"prompt methods need the MulT backbone, got {type(backbone).__name__}"
            )
        if not callable(getattr(prompts, "prompt_for", None)):
            raise ConfigError(f"{type(prompts).__name__} has no prompt_for(site, ctx) method")
        if trainable_head not in HEAD_CHOICES:
            raise ConfigError(
                f"trainable_head must be one of {list(HEAD_CHOICES)}, got {trainable_head!r}"
            )
        self.backbone = backbone
        self.prompts = prompts
        self.trainable_head = trainable_head
        # Registered only when used, so the other heads' state dicts are unchanged.
        self.pattern_outputs: PatternOutputs | None = None
        if trainable_head == PATTERN_HEAD:
            self.pattern_outputs = PatternOutputs(
                backbone.out_layer, len(backbone.layout.modalities)
            )
        # The method's extra loss term of the last training batch (None: none), for its plugin.
        self.aux_loss: Tensor | None = None
        set_requires_grad(self.backbone.parameters(), False)
        set_requires_grad(self.head_parameters(), True)

    def head_parameters(self) -> list[nn.Parameter]:
        """The backbone's head parameters that this wrapper trains (none by default)."""
        if self.pattern_outputs is not None:
            return list(self.pattern_outputs.parameters())
        return [
            p
            for name in TRAINABLE_HEADS[self.trainable_head]
            for p in getattr(self.backbone, name).parameters()
        ]

    def method_parameters(self) -> list[nn.Parameter]:
        """Every parameter the method may train: all prompts and the trainable head layers."""
        return [*self.prompts.parameters(), *self.head_parameters()]

    def prepare(self, x: Tensor) -> Tensor:
        """The per-batch step before the backbone runs: compute what ``prompts.prompt_for`` hands
        out for this batch (kept in ``prompts.current``) and return the input the backbone runs
        on. Default: nothing to compute, ``x`` as given."""
        return x

    def run(self, x: Tensor) -> Tensor:
        """The prediction for the prepared input, called inside the prompt hook: the backbone's."""
        return self.backbone(x)

    @contextlib.contextmanager
    def _pattern_outputs_for(self, presence: Tensor | None) -> Iterator[None]:
        """With ``trainable_head="pattern"``: while the backbone runs, the output of its frozen
        ``out_layer`` is replaced by each sample's pattern copy (a forward hook, so a method's
        own ``run`` needs no change)."""
        if self.pattern_outputs is None or presence is None:
            yield
            return
        outputs = self.pattern_outputs

        def replace(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            return outputs(inputs[0], presence)

        handle = self.backbone.out_layer.register_forward_hook(replace)
        try:
            yield
        finally:
            handle.remove()

    def forward(self, x: Tensor) -> Tensor:
        # The presence mask as given, before ``prepare`` (which may fill in missing modalities).
        presence = self.backbone.layout.unpack(x)[1] if self.pattern_outputs is not None else None
        try:
            prepared = self.prepare(x)
            with (
                self.backbone.using_prompt_hook(self.prompts.prompt_for),
                self._pattern_outputs_for(presence),
            ):
                return self.run(prepared)
        finally:
            # A batch's prompts must not outlive it: a later call of prompt_for (another batch,
            # a frozen pass) would otherwise read them. Modules without a stash are left alone.
            if getattr(self.prompts, "current", None) is not None:
                self.prompts.current = None


class _RequiresGradAdam:
    """Mixin for Avalanche templates: a fresh Adam over the ``requires_grad`` parameters."""

    adam_lr: float

    def make_optimizer(self, **kwargs: Any) -> None:
        params = trainable_parameters(self.model)  # type: ignore[attr-defined]
        if not params:
            raise ConfigError("nothing to train: every parameter of the model is frozen")
        self.optimizer = adam(params, self.adam_lr)


@functools.cache
def _template_classes() -> tuple[type, type]:
    """The two template classes, made on first use (importing Avalanche takes seconds)."""
    from avalanche.training import JointTraining, Naive

    class PromptNaive(_RequiresGradAdam, Naive):
        """Sequential training of the ``requires_grad`` parameters only."""

        def __init__(self, *, adam_lr: float, **kwargs: Any) -> None:
            self.adam_lr = adam_lr
            super().__init__(**kwargs)

    class PromptJointTraining(_RequiresGradAdam, JointTraining):
        """Joint training of the ``requires_grad`` parameters only."""

        def __init__(self, *, adam_lr: float, **kwargs: Any) -> None:
            self.adam_lr = adam_lr
            super().__init__(**kwargs)

    return PromptNaive, PromptJointTraining


def make_prompt_template(
    model: nn.Module,
    ctx: StrategyContext,
    *,
    joint: bool = False,
    plugins: Sequence[Any] = (),
) -> Any:
    """An Avalanche ``Naive`` (or ``JointTraining`` when ``joint``) that optimises, with a fresh
    Adam at every experience, only the parameters of ``model`` that have ``requires_grad``.

    ``plugins`` come before the runner's own (``ctx.plugins``), so a plugin that changes which
    parameters train in ``before_training_exp`` runs before anything that reads them.
    """
    naive, joint_training = _template_classes()
    kwargs = ctx.template_kwargs()
    kwargs["plugins"] = [*plugins, *kwargs["plugins"]]
    params = trainable_parameters(model)
    if not params:
        raise ConfigError("nothing to train: every parameter of the model is frozen")
    cls = joint_training if joint else naive
    return cls(model=model, optimizer=adam(params, ctx.lr), adam_lr=ctx.lr, **kwargs)
