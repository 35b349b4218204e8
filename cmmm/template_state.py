"""What an Avalanche template carries from one experience to the next, as tensors and plain
containers: what ``torch.load(weights_only=True)`` reads back without running any code.

Why not pickle the template, as Avalanche's ``save_checkpoint`` does (dill, the whole strategy)?
Loading a pickle runs code from the file (the project refuses to unpickle untrusted files), our
plugins are classes made inside functions, and the replay buffers would be pickled with every
sample they hold. Instead the runner rebuilds the template from the configuration exactly as a
fresh run does, and ``restore_template_state`` loads into it, piece by piece:

* the model's ``state_dict`` and which of its parameters have ``requires_grad``;
* the optimizer's ``state_dict`` with the names of the parameters it holds (a prompt template
  builds a new optimizer over a changing subset of the parameters at every experience);
* what the template itself keeps across ``train`` calls: whether its optimizer was set up already
  (``optimized_param_id``; a fresh template resets Adam's moments on its first experience, an
  uninterrupted one keeps them), and DER's replay buffer (``storage_policy``);
* every plugin's state, in the order of ``template.plugins``. Our own plugins implement
  ``Checkpointable``, or declare ``stateless_between_experiences = True``; Avalanche's plugins that
  the strategies use are handled here, one pair of functions per class. Any other plugin is
  refused at the first checkpoint: a new strategy must say what its plugins keep, rather than
  resume silently without it.

Replay buffers hold Avalanche datasets. They are saved as the sample keys of the samples they hold
(``cmmm.data.missing_stream.SAMPLE_KEY``) plus whatever the buffer adds (reservoir weights, DER's
stored outputs), and rebuilt as subsets of the same stream's training sets (``StreamSamples``).

The random number generators are not part of this: the caller restores them last (``cmmm.
checkpoints``), after everything here has been rebuilt (rebuilding may draw random numbers).
"""

from __future__ import annotations

import copy
import functools
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from cmmm.data.missing_stream import SAMPLE_KEY
from cmmm.errors import CheckpointError
from cmmm.legacy_state import convert_training_state

State = dict[str, Any]


class StreamSamples:
    """The stream's training samples, addressed by their sample keys."""

    def __init__(self, train_stream: Iterable[Any]) -> None:
        self._train_stream = train_stream
        self._all: Any = None

    def keys(self, dataset: Any) -> list[int]:
        """The sample keys of the samples in an Avalanche ``dataset``, in its order."""
        if len(dataset) == 0:
            return []
        keys = getattr(dataset, SAMPLE_KEY, None)
        if keys is None:
            raise CheckpointError(
                f"a replay buffer holds samples without a {SAMPLE_KEY!r}: it was not built from "
                "the stream's training sets, so the checkpoint cannot name them"
            )
        return [int(key) for key in keys]

    def dataset(self, keys: Sequence[int]) -> Any:
        """The samples with these keys, in this order, as a subset of the training sets."""
        if self._all is None:
            # Built on first use: a fresh run only ever reads keys.
            experiences = [experience.dataset for experience in self._train_stream]
            self._all = functools.reduce(lambda a, b: a.concat(b), experiences)
        if keys and not 0 <= min(keys) <= max(keys) < len(self._all):
            raise CheckpointError(
                f"the checkpoint names training samples up to {max(keys)} but the stream has "
                f"{len(self._all)}; it was written for other data"
            )
        return self._all.subset(list(keys))


@dataclass
class StateContext:
    """What saving and restoring a plugin may need besides the plugin itself."""

    template: Any
    samples: StreamSamples

    @property
    def device(self) -> torch.device:
        return torch.device(self.template.device)


@runtime_checkable
class Checkpointable(Protocol):
    """A plugin whose state between experiences goes into checkpoints.

    ``checkpoint_state`` returns tensors and plain containers only (dict, list, tuple, str, int,
    float, bool, None); ``restore_checkpoint_state`` puts that state into a freshly built plugin
    of the same configuration.
    """

    def checkpoint_state(self, context: StateContext) -> State: ...

    def restore_checkpoint_state(self, state: State, context: StateContext) -> None: ...


# --------------------------------------------------------------------------------------------
# The whole template
# --------------------------------------------------------------------------------------------


def capture_template_state(template: Any, samples: StreamSamples) -> State:
    """Everything ``restore_template_state`` needs to continue ``template`` where it is now."""
    context = StateContext(template, samples)
    model: nn.Module = template.model
    return {
        "model": model.state_dict(),
        "trainable": [name for name, p in model.named_parameters() if p.requires_grad],
        "optimizer": _optimizer_state(template),
        "template": _template_attributes(template, context),
        "plugins": [
            {"type": _type_name(plugin), "state": _plugin_state(plugin, context)}
            for plugin in template.plugins
        ],
    }


def restore_template_state(template: Any, state: State, samples: StreamSamples) -> None:
    """Load a ``capture_template_state`` result into a template freshly built from the same
    configuration."""
    context = StateContext(template, samples)
    model: nn.Module = template.model
    # A checkpoint written before MulT's transformers were stacked names their old parameters.
    convert_training_state(model, state)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise CheckpointError(
            f"the saved model does not fit this strategy's model: {error}"
        ) from None
    trainable = set(state["trainable"])
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trainable)
    _restore_template_attributes(template, state["template"], context)
    saved_plugins = state["plugins"]
    types = [_type_name(plugin) for plugin in template.plugins]
    # A plugin that moved or was renamed lists its earlier names (``former_names``), so a run
    # interrupted before the move resumes after it. Only the class's own names count: a subclass
    # (a method's plugin built on the kit's) was never called by its base's former names.
    if len(saved_plugins) != len(types) or not all(
        entry["type"] in (name, *vars(type(plugin)).get("former_names", ()))
        for entry, name, plugin in zip(saved_plugins, types, template.plugins, strict=True)
    ):
        raise CheckpointError(
            f"the checkpoint's plugins {[entry['type'] for entry in saved_plugins]} are not this "
            f"strategy's {types}; it was written by another version of the strategy"
        )
    for plugin, entry in zip(template.plugins, saved_plugins, strict=True):
        _restore_plugin_state(plugin, entry["state"], context)
    _restore_optimizer_state(template, state["optimizer"])


def _type_name(value: Any) -> str:
    return f"{type(value).__module__}.{type(value).__qualname__}"


# --------------------------------------------------------------------------------------------
# Optimizer and template attributes
# --------------------------------------------------------------------------------------------


def _optimizer_state(template: Any) -> State:
    optimizer: torch.optim.Optimizer = template.optimizer
    names = {id(p): name for name, p in template.model.named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        if any(id(p) not in names for p in group["params"]):
            raise CheckpointError(
                "the optimizer holds a parameter that is not one of the model's; cmmm can only "
                "checkpoint optimizers over the model's parameters"
            )
        groups.append([names[id(p)] for p in group["params"]])
    return {"parameters": groups, "state_dict": optimizer.state_dict()}


def _restore_optimizer_state(template: Any, state: State) -> None:
    optimizer: torch.optim.Optimizer = template.optimizer
    parameters = dict(template.model.named_parameters())
    groups = state["parameters"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(
            f"the saved optimizer has {len(groups)} parameter groups, this one "
            f"{len(optimizer.param_groups)}"
        )
    try:
        # The optimizer as it was: the same parameters (by name) in the same order, then its
        # state (Adam's moments and step counts) and its group settings.
        for group, names in zip(optimizer.param_groups, groups, strict=True):
            group["params"] = [parameters[name] for name in names]
        optimizer.load_state_dict(state["state_dict"])
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"the saved optimizer does not fit this model: {error}") from None


def _template_attributes(template: Any, context: StateContext) -> State:
    from avalanche.training.storage_policy import ExemplarsBuffer

    state: State = {}
    if hasattr(template, "optimized_param_id"):
        state["optimizer_set_up"] = template.optimized_param_id is not None
    if isinstance(getattr(template, "storage_policy", None), ExemplarsBuffer):
        state["storage_policy"] = _buffer_state(template.storage_policy, context)
    return state


def _restore_template_attributes(template: Any, state: State, context: StateContext) -> None:
    if state.get("optimizer_set_up"):
        # What BatchObservation.make_optimizer last stored: the model's name -> parameter map
        # (update_optimizer returns it). With it the next experience keeps the optimizer's state
        # instead of treating the template as new and resetting it.
        template.optimized_param_id = dict(template.model.named_parameters())
    if "storage_policy" in state:
        _restore_buffer(template.storage_policy, state["storage_policy"], context)


# --------------------------------------------------------------------------------------------
# Plugins
# --------------------------------------------------------------------------------------------

Saver = Callable[[Any, StateContext], State]
Loader = Callable[[Any, State, StateContext], None]


def _plugin_state(plugin: Any, context: StateContext) -> State | None:
    if isinstance(plugin, Checkpointable):
        return plugin.checkpoint_state(context)
    if getattr(plugin, "stateless_between_experiences", False):
        return None
    handler = _avalanche_handler(plugin)
    return None if handler is None else handler[0](plugin, context)


def _restore_plugin_state(plugin: Any, state: State | None, context: StateContext) -> None:
    if isinstance(plugin, Checkpointable):
        plugin.restore_checkpoint_state(state or {}, context)
        return
    if getattr(plugin, "stateless_between_experiences", False):
        return
    handler = _avalanche_handler(plugin)
    if handler is not None and state is not None:
        handler[1](plugin, state, context)


def _avalanche_handler(plugin: Any) -> tuple[Saver, Loader] | None:
    """The save/load pair for one of Avalanche's plugins; None for those that keep nothing."""
    for kind, handler in _avalanche_handlers():
        if isinstance(plugin, kind):
            return handler
    raise CheckpointError(
        f"cannot checkpoint the plugin {_type_name(plugin)}: cmmm does not know what it keeps "
        "between experiences. Give it checkpoint_state/restore_checkpoint_state "
        "(cmmm.template_state.Checkpointable), or stateless_between_experiences = True if it "
        "keeps nothing"
    )


@functools.cache
def _avalanche_handlers() -> tuple[tuple[type, tuple[Saver, Loader] | None], ...]:
    from avalanche.training.plugins import (
        AGEMPlugin,
        EvaluationPlugin,
        EWCPlugin,
        LwFPlugin,
        ReplayPlugin,
        SynapticIntelligencePlugin,
    )
    from avalanche.training.plugins.clock import Clock
    from avalanche.training.templates.base_sgd import PeriodicEval

    return (
        (Clock, (_clock_state, _restore_clock)),
        (ReplayPlugin, (_replay_state, _restore_replay)),
        (EWCPlugin, (_ewc_state, _restore_ewc)),
        (SynapticIntelligencePlugin, (_si_state, _restore_si)),
        (LwFPlugin, (_lwf_state, _restore_lwf)),
        (AGEMPlugin, (_agem_state, _restore_agem)),
        # Nothing of theirs reaches the next experience: cmmm's own evaluator does the scoring
        # (the EvaluationPlugin has no metric) and periodic evaluation is off.
        (EvaluationPlugin, None),
        (PeriodicEval, None),
    )


# Avalanche's Clock: its counters (EWC and SI read train_exp_counter).
_CLOCK_COUNTERS = (
    "train_iterations",
    "train_exp_counter",
    "train_exp_epochs",
    "train_exp_iterations",
    "train_epoch_iterations",
    "total_iterations",
)


def _clock_state(clock: Any, context: StateContext) -> State:
    return {name: int(getattr(clock, name)) for name in _CLOCK_COUNTERS}


def _restore_clock(clock: Any, state: State, context: StateContext) -> None:
    for name in _CLOCK_COUNTERS:
        setattr(clock, name, state[name])


def _replay_state(plugin: Any, context: StateContext) -> State:
    return {"storage_policy": _buffer_state(plugin.storage_policy, context)}


def _restore_replay(plugin: Any, state: State, context: StateContext) -> None:
    _restore_buffer(plugin.storage_policy, state["storage_policy"], context)


def _param_data_state(values: dict[str, Any]) -> dict[str, tuple[str, Tensor]]:
    """Avalanche's ParamData (a named tensor) by parameter name, as (its name, a copy)."""
    return {key: (data.name, data.data.detach().clone()) for key, data in values.items()}


def _param_data(state: dict[str, tuple[str, Tensor]], device: torch.device) -> dict[str, Any]:
    from avalanche.training.utils import ParamData

    return {
        key: ParamData(name, init_tensor=tensor.to(device), device=device)
        for key, (name, tensor) in state.items()
    }


def _ewc_state(plugin: Any, context: StateContext) -> State:
    # Parameters and Fisher importances after each past experience (by experience index).
    return {
        "saved_params": {t: _param_data_state(v) for t, v in plugin.saved_params.items()},
        "importances": {t: _param_data_state(v) for t, v in plugin.importances.items()},
    }


def _restore_ewc(plugin: Any, state: State, context: StateContext) -> None:
    for name in ("saved_params", "importances"):
        values = {t: _param_data(v, context.device) for t, v in state[name].items()}
        setattr(plugin, name, defaultdict(dict, values))


def _si_state(plugin: Any, context: StateContext) -> State:
    # The anchors and importances (ewc_data) and the running path integrals (syn_data; SI keeps
    # them on the CPU whatever the model's device).
    return {
        "ewc_data": [_param_data_state(values) for values in plugin.ewc_data],
        "syn_data": {key: _param_data_state(values) for key, values in plugin.syn_data.items()},
    }


def _restore_si(plugin: Any, state: State, context: StateContext) -> None:
    cpu = torch.device("cpu")
    anchors, importances = (_param_data(values, cpu) for values in state["ewc_data"])
    plugin.ewc_data = (anchors, importances)
    plugin.syn_data = {key: _param_data(values, cpu) for key, values in state["syn_data"].items()}


def frozen_copy(model: nn.Module, state_dict: dict[str, Tensor]) -> nn.Module:
    """A copy of ``model`` with ``state_dict`` loaded, in eval mode, with no parameter training:
    how the distillation plugins keep their previous model."""
    previous = copy.deepcopy(model)
    previous.load_state_dict(state_dict)
    previous.eval()
    for parameter in previous.parameters():
        parameter.requires_grad_(False)
        parameter.grad = None
    return previous


def _lwf_state(plugin: Any, context: StateContext) -> State:
    lwf = plugin.lwf
    return {
        "previous_model": None if lwf.prev_model is None else lwf.prev_model.state_dict(),
        "experiences": int(lwf.expcount),
        # Lists in the sets' own order (the distillation indexes outputs with them).
        "previous_classes": {t: list(c) for t, c in lwf.prev_classes_by_task.items()},
    }


def _restore_lwf(plugin: Any, state: State, context: StateContext) -> None:
    lwf = plugin.lwf
    lwf.expcount = state["experiences"]
    lwf.prev_classes_by_task = defaultdict(
        set, {t: set(c) for t, c in state["previous_classes"].items()}
    )
    previous = state["previous_model"]
    lwf.prev_model = None if previous is None else frozen_copy(context.template.model, previous)


def _agem_state(plugin: Any, context: StateContext) -> State:
    return {"buffers": [context.samples.keys(buffer) for buffer in plugin.buffers]}


def _restore_agem(plugin: Any, state: State, context: StateContext) -> None:
    from avalanche.benchmarks.utils.data_loader import GroupBalancedInfiniteDataLoader

    plugin.buffers = [context.samples.dataset(keys) for keys in state["buffers"]]
    if plugin.buffers:
        # As AGEMPlugin.update_memory leaves them after every experience: a loader balanced over
        # the buffers and a new iterator on it (a generator: it draws nothing until first used).
        plugin.buffer_dataloader = GroupBalancedInfiniteDataLoader(
            plugin.buffers,
            batch_size=plugin.sample_size // len(plugin.buffers),
            num_workers=0,
            pin_memory=False,
            persistent_workers=False,
        )
        plugin.buffer_dliter = iter(plugin.buffer_dataloader)


# --------------------------------------------------------------------------------------------
# Replay buffers (Avalanche storage policies)
# --------------------------------------------------------------------------------------------

_LOGITS = "logits"  # the data attribute DER's buffers add: the outputs stored with each sample


def _buffer_state(policy: Any, context: StateContext) -> State:
    """A balanced buffer of reservoir groups (ER's per experience, DER's per class or single)."""
    from avalanche.training.storage_policy import (
        BalancedExemplarsBuffer,
        ExperienceBalancedBuffer,
        ReservoirSamplingBuffer,
    )

    groups = getattr(policy, "buffer_groups", {})
    if not isinstance(policy, BalancedExemplarsBuffer) or not all(
        isinstance(group, ReservoirSamplingBuffer) for group in groups.values()
    ):
        raise CheckpointError(
            f"cannot checkpoint a {_type_name(policy)} replay buffer; cmmm saves balanced "
            "buffers of reservoir groups"
        )
    state: State = {
        "max_size": int(policy.max_size),
        # In the dict's order: the buffer is the concatenation of the groups in that order.
        "groups": [
            {
                "key": key,
                "max_size": int(group.max_size),
                "samples": context.samples.keys(group.buffer),
                "weights": group._buffer_weights.clone(),
                "logits": (
                    torch.stack(list(getattr(group.buffer, _LOGITS)))
                    if len(group.buffer) and hasattr(group.buffer, _LOGITS)
                    else None
                ),
            }
            for key, group in groups.items()
        ],
    }
    if isinstance(policy, ExperienceBalancedBuffer):
        # How many experiences it has seen: it sizes the groups (a private counter).
        state["experiences_seen"] = int(policy._num_exps)
    if hasattr(policy, "seen_classes"):
        state["seen_classes"] = list(policy.seen_classes)
    return state


def _restore_buffer(policy: Any, state: State, context: StateContext) -> None:
    from avalanche.training.storage_policy import ReservoirSamplingBuffer

    policy.max_size = state["max_size"]
    policy.buffer_groups.clear()
    for saved in state["groups"]:
        group = ReservoirSamplingBuffer(saved["max_size"])
        data = context.samples.dataset(saved["samples"])
        if saved["logits"] is not None:
            data = _with_logits(data, saved["logits"])
        group.buffer = data
        group._buffer_weights = saved["weights"]
        policy.buffer_groups[saved["key"]] = group
    if "experiences_seen" in state:
        policy._num_exps = state["experiences_seen"]
    if "seen_classes" in state:
        policy.seen_classes = set(state["seen_classes"])


def _with_logits(data: Any, logits: Tensor) -> Any:
    """``data`` with DER's per-sample stored outputs, as DER's own buffer update attaches them."""
    from avalanche.benchmarks.utils import make_avalanche_dataset
    from avalanche.benchmarks.utils.data_attribute import TensorDataAttribute
    from avalanche.benchmarks.utils.flat_data import FlatData

    rows = list(logits.unbind(0))
    return make_avalanche_dataset(
        data,
        data_attributes=[
            TensorDataAttribute(
                FlatData([rows], discard_elements_not_in_indices=True),
                name=_LOGITS,
                use_in_getitem=True,
            )
        ],
    )
