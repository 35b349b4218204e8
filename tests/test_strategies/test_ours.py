"""The method ("ours", "joint-ours") and the shared PromptedModel / prompt template."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from cmmm.backbone import MulT, MulTConfig, PromptContext, per_sample_prompt
from cmmm.data.missing_stream import build_stream
from cmmm.data.packing import PackedLayout
from cmmm.data.patterns import all_patterns, parse_task_order
from cmmm.errors import ConfigError
from cmmm.kit.pattern_prompts import pattern_key
from cmmm.prompted_model import PromptedModel, make_prompt_template
from cmmm.strategy import STRATEGIES, StrategyContext
from strategies.ours import (
    OURS_OPTIONS,
    JointOurs,
    Ours,
    OursOptions,
    OursPrompts,
    contrastive_task_loss,
    positive_pairs,
    resolve_layers,
)

AVT = ("audio", "video", "text")
T, F_ = True, False
FULL, VT, AV, AT = (T, T, T), (F_, T, T), (T, T, F_), (T, F_, T)
A, V, TX = (T, F_, F_), (F_, T, F_), (F_, F_, T)
TINY_MULT = MulTConfig(layers=3, self_layers=1)


def quiet(_: str) -> None:
    pass


@pytest.fixture
def stream(tiny_dataset):
    return build_stream(tiny_dataset, all_patterns(3))


def make_backbone(layout: PackedLayout, seed: int = 0, config: MulTConfig = TINY_MULT) -> MulT:
    torch.manual_seed(seed)
    return MulT(layout, config)


def context_for(stream, backbone: nn.Module, lr: float = 1e-2) -> StrategyContext:
    return StrategyContext(
        model=backbone,
        stream=stream,
        criterion=nn.L1Loss(),
        epochs=1,
        batch_size=32,
        eval_batch_size=64,
        lr=lr,
        device=torch.device("cpu"),
    )


def build(stream, strategy_cls=Ours, seed: int = 0, **options):
    """(strategy, template) on a fresh tiny backbone; prompts initialised from ``seed``."""
    backbone = make_backbone(stream.layout, seed=seed)
    strategy = strategy_cls(**options)
    torch.manual_seed(seed + 1)
    template = strategy.build(context_for(stream, backbone))
    return strategy, template


def mixed_batch(stream, per_task: int = 2) -> tuple[torch.Tensor, list[tuple[bool, ...]]]:
    """A test batch holding ``per_task`` samples of every task of the stream, and their patterns."""
    xs, patterns = [], []
    for task in stream.tasks:
        x, _ = task.test.tensors()
        xs.append(x[:per_task])
        patterns += [task.pattern] * per_task
    return torch.cat(xs), patterns


def context_of(x: torch.Tensor, layout: PackedLayout) -> PromptContext:
    _, presence = layout.unpack(x)
    return PromptContext(presence, layout.modalities, x.shape[0], x.device)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------


def test_defaults_are_method_md_values_and_round_trip() -> None:
    options = Ours().options()
    assert options == asdict(OursOptions())
    expected = {
        "use_modality": True,
        "use_task_aware": True,
        "use_task_specific": True,
        "order": "m,ta,ts",
        "placement": "front",
        "depth_m": 1,
        "depth_ta": 1,
        "depth_ts": 1,
        "prompt_length": 16,
        "prompt_init_std": 0.02,
        "key_init": 1.0,
        "task_aware_combine": "sum",
        "tau": 0.5,
        "beta": 1.0,
        "lam": 0.1,
        "positive_pairs": "swap",
        # Not method.md's: chosen on mfeat validation by issue 18's study.
        "trainable_head": "pattern",
        "task_identity": "pattern",
    }
    assert {k: options[k] for k in expected} == expected
    json.dumps(options)  # results.json-ready
    assert Ours(**options).options() == options
    assert "ours" in STRATEGIES and "joint-ours" in STRATEGIES
    assert STRATEGIES.get("joint-ours").factory.joint and not STRATEGIES.get("ours").factory.joint


@pytest.mark.parametrize("strategy", ["ours", "joint-ours"])
def test_a_changed_default_is_in_the_run_key_and_stored_runs_keep_theirs(strategy) -> None:
    from dataclasses import replace

    from cmmm.running import RunConfig

    new = RunConfig(strategy=strategy).resolved()
    assert new.strategy_options == {"trainable_head": "pattern"}
    old_explicit = RunConfig(strategy=strategy, strategy_options={"trainable_head": "none"})
    # A run stored before the change: resolved then, with no option recorded.
    stored = replace(new, strategy_options={})
    assert old_explicit.resolved().key() == stored.key()  # old runs are reused when asked for
    assert new.key() != stored.key()  # and never taken for runs of the new default
    given = RunConfig(strategy=strategy, strategy_options={"trainable_head": "out"}).resolved()
    assert given.strategy_options == {"trainable_head": "out"}
    compositional = RunConfig(strategy="ours-compositional").resolved()
    assert compositional.strategy_options == {}
    assert STRATEGIES.get("ours-compositional").factory().options()["trainable_head"] == "none"


def test_list_options_accept_json_lists_comma_strings_and_integers() -> None:
    assert Ours(layers_ts="2,0").options()["layers_ts"] == [0, 2]
    assert Ours(layers_ts=[2, 0]).options()["layers_ts"] == [0, 2]
    assert Ours(layers_ts="[0, 2]").options()["layers_ts"] == [0, 2]
    assert Ours(layers_m=1).options()["layers_m"] == [1]
    assert Ours(order=["ts", "m", "ta"]).options()["order"] == "ts,m,ta"
    assert Ours(positive_pairs=["vt-av", "a-t"]).options()["positive_pairs"] == "vt-av,a-t"
    assert Ours(tau=1, use_modality="false").options()["tau"] == 1.0


def test_every_declared_option_is_listed_with_help_and_accepts_its_own_default() -> None:
    strategy = Ours()
    assert set(strategy.option_help()) == set(OURS_OPTIONS) == set(strategy.options())
    assert all(help_line for help_line in strategy.option_help().values())
    explicit = Ours(**{name: option.default for name, option in OURS_OPTIONS.items()})
    assert explicit.options() == strategy.options()
    assert Ours(use_task_aware="true", layers_m="auto").options()["layers_m"] is None


def test_unknown_options_list_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match="unknown option.*prompt_lenght") as error:
        Ours(prompt_lenght=8)
    assert "prompt_length" in str(error.value) and "task_identity" in str(error.value)
    with pytest.raises(ConfigError, match="unknown option"):
        JointOurs(lambda_=0.1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tau": 0}, "tau"),
        ({"tau": "warm"}, "tau"),
        ({"lam": -1}, "lam"),
        ({"beta": True}, "beta"),
        ({"prompt_length": 0}, "prompt_length"),
        ({"prompt_length": 2.5}, "prompt_length"),
        ({"order": "m,ta"}, "order"),
        ({"order": "m,ta,ta"}, "order"),
        ({"placement": "middle"}, "placement"),
        ({"task_aware_combine": "mean"}, "task_aware_combine"),
        ({"trainable_head": "proj"}, "trainable_head"),
        ({"task_identity": "index"}, "task_identity"),
        ({"use_modality": "maybe"}, "use_modality"),
        ({"layers_ts": "x"}, "layers_ts"),
        ({"layers_ts": [0, 0]}, "layers_ts"),
        ({"layers_ts": [-1]}, "layers_ts"),
        ({"layers_ts": ""}, "layers_ts"),
        ({"depth_ta": -1}, "depth_ta"),
        ({"depth_ts": 0}, "depth_ts"),
        (
            {
                "use_modality": False,
                "use_task_aware": False,
                "use_task_specific": False,
                "trainable_head": "none",
            },
            "nothing",
        ),
    ],
)
def test_wrong_option_values_are_config_errors(options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        Ours(**options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prompt_dim": 16}, "prompt_dim=16 but the model width d is 30"),
        ({"depth_m": 2, "depth_ta": 1}, "need 4 layers"),
        ({"layers_ts": [3]}, "layers 0..2"),
        ({"positive_pairs": "vt-xz"}, "not a pattern"),
        ({"positive_pairs": "vt-tv"}, "itself"),
    ],
)
def test_options_that_do_not_fit_the_backbone_fail_at_build(stream, options, message) -> None:
    strategy = Ours(**options)
    with pytest.raises(ConfigError, match=message):
        strategy.build(context_for(stream, make_backbone(stream.layout)))


def test_prompt_dim_equal_to_the_width_is_accepted(stream) -> None:
    build(stream, prompt_dim=30)


def test_layer_resolution() -> None:
    assert resolve_layers(OursOptions(), 5) == {"m": (0,), "ta": (1,), "ts": (2,)}
    assert resolve_layers(OursOptions(placement="back"), 5) == {"m": (2,), "ta": (3,), "ts": (4,)}
    assert resolve_layers(OursOptions(order="ts,m,ta"), 3) == {"ts": (0,), "m": (1,), "ta": (2,)}
    deep = OursOptions(depth_m=2, depth_ta=2, depth_ts=1)
    assert resolve_layers(deep, 5) == {"m": (0, 1), "ta": (2, 3), "ts": (4,)}
    # A disabled type takes no layers: the next ones move up.
    no_m = OursOptions(use_modality=False)
    assert resolve_layers(no_m, 3) == {"m": (), "ta": (0,), "ts": (1,)}
    # Explicit lists replace the computed layers of their type only.
    explicit = OursOptions.from_options({"layers_ts": "0,1"})
    assert resolve_layers(explicit, 3) == {"m": (0,), "ta": (1,), "ts": (0, 1)}
    # Types with explicit layers need no depth: all three fit a one-layer model.
    shared = OursOptions.from_options({"layers_m": "0", "layers_ta": "0", "layers_ts": "0"})
    assert resolve_layers(shared, 1) == {"m": (0,), "ta": (0,), "ts": (0,)}
    back = OursOptions.from_options({"placement": "back", "layers_m": "0"})
    assert resolve_layers(back, 5) == {"m": (0,), "ta": (3,), "ts": (4,)}


# ------------------------------------------------------------------------------------------------
# PromptedModel and the template's optimizer
# ------------------------------------------------------------------------------------------------


def test_prompted_model_registers_prompts_and_freezes_only_the_backbone(stream) -> None:
    strategy, template = build(stream, trainable_head="none")
    model = template.model
    assert isinstance(model, PromptedModel)
    prompt_ids = {id(p) for p in model.prompts.parameters()}
    assert prompt_ids <= {id(p) for p in model.parameters()}
    assert any(k.startswith("prompts.task_specific.") for k in model.state_dict())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.prompts.parameters())
    # Dropout behaves as the backbone's own: on in train mode, off in eval mode.
    model.train()
    assert model.backbone.training
    model.eval()
    assert not model.backbone.training
    # The hook is only set during the forward pass, and it is the prompts' own.
    assert model.backbone.prompt_hook is None
    seen = []
    model.backbone.register_forward_pre_hook(lambda mod, _: seen.append(mod.prompt_hook))
    model(mixed_batch(stream, 1)[0])
    assert seen == [model.prompts.prompt_for]
    assert model.backbone.prompt_hook is None


@pytest.mark.parametrize(
    ("head", "names"),
    [("none", []), ("out", ["out_layer"]), ("all", ["proj1", "proj2", "out_layer"])],
)
def test_trainable_head_option(stream, head, names) -> None:
    _, template = build(stream, trainable_head=head)
    backbone = template.model.backbone
    training = {n.split(".")[0] for n, p in backbone.named_parameters() if p.requires_grad}
    assert training == set(names)


def test_pattern_heads_start_as_the_frozen_output_layer_and_train_with_their_own_pattern(
    stream,
) -> None:
    strategy, template = build(stream, trainable_head="pattern")
    model, prompts = template.model, strategy.prompts
    backbone = model.backbone
    assert not any(p.requires_grad for p in backbone.parameters())
    x, _ = mixed_batch(stream)
    model.eval()
    with torch.no_grad():
        # Before any training every pattern's copy equals out_layer: the same output.
        assert torch.allclose(model(x), PromptedModel(backbone, prompts)(x), atol=1e-6)
    initial = snapshot(prompts)
    benchmark = stream.avalanche_benchmark()
    template.train(benchmark.train_stream[0])
    first = pattern_key(stream.tasks[0].pattern)
    trained = prompts.head_weight[first].detach().clone()
    assert not torch.equal(trained, initial[f"head_weight.{first}"])
    template.train(benchmark.train_stream[1])
    second = pattern_key(stream.tasks[1].pattern)
    assert torch.equal(prompts.head_weight[first], trained)  # an old head cannot forget
    assert not torch.equal(prompts.head_weight[second], initial[f"head_weight.{second}"])
    for later in stream.tasks[2:]:
        key = pattern_key(later.pattern)
        assert torch.equal(prompts.head_weight[key], initial[f"head_weight.{key}"])


def test_pattern_head_routes_each_sample_to_its_own_patterns_layer(stream) -> None:
    strategy, template = build(stream, trainable_head="pattern", unseen_patterns="own")
    model, prompts = template.model, strategy.prompts
    x, patterns = mixed_batch(stream)
    with torch.no_grad():
        for key in prompts.head_bias:
            prompts.head_bias[key].fill_(float(int(key[1:], 2)))
    model.eval()
    with torch.no_grad():
        hidden = model.backbone.head_hidden(model.backbone.forward_features(x))
        _, presence = stream.layout.unpack(x)
        out = prompts.pattern_head(hidden, presence)
        shared_weight = model.backbone.out_layer.weight
        for row, pattern in enumerate(patterns):
            bits = float(int(pattern_key(pattern)[1:], 2))
            expected = hidden[row] @ shared_weight.T + bits
            assert torch.allclose(out[row], expected, atol=1e-5)


def test_optimizer_holds_exactly_the_current_trainable_parameters(stream) -> None:
    """Rebuilt at each experience over the requires_grad parameters only: no backbone weight and
    no other task's task-specific set, and no Adam state carried from the previous experience."""
    strategy, template = build(stream)
    prompts = strategy.prompts
    benchmark = stream.avalanche_benchmark()
    optimizers = []
    for i in (0, 1):
        template.train(benchmark.train_stream[i])
        optimizers.append(template.optimizer)
        in_optimizer = {id(p) for group in template.optimizer.param_groups for p in group["params"]}
        pattern = stream.tasks[i].pattern
        shared = {
            id(p)
            for name, p in prompts.named_parameters()
            if not name.startswith(("task_specific", "head_"))
        }
        own = {id(prompts.task_specific_set(pattern))}
        own |= {id(p) for p in prompts.pattern_head_parameters(pattern)}  # its output layer
        assert len(own) == 3
        assert in_optimizer == shared | own
    assert optimizers[0] is not optimizers[1]
    # The new Adam has state only for what it trained in this experience.
    state_ids = {id(p) for p in optimizers[1].state}
    assert id(prompts.task_specific_set(stream.tasks[0].pattern)) not in state_ids


def test_make_prompt_template_rejects_a_fully_frozen_model(stream) -> None:
    backbone = make_backbone(stream.layout)
    for p in backbone.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing to train"):
        make_prompt_template(backbone, context_for(stream, backbone))


# ------------------------------------------------------------------------------------------------
# Which prompts go where
# ------------------------------------------------------------------------------------------------


def distinctive_prompts(prompts: OursPrompts) -> None:
    """P_m = 1 + modality index, k+ = 2, k- = -3, TS set of pattern i, branch b = 10 i + b."""
    with torch.no_grad():
        for i, m in enumerate(prompts.modalities):
            prompts.modality[m].fill_(1.0 + i)
        prompts.key_present.fill_(2.0)
        prompts.key_missing.fill_(-3.0)
        for i, p in enumerate(prompts.patterns):
            ts = prompts.task_specific_set(p)
            for b in range(len(prompts.modalities)):
                ts[b].fill_(10.0 * i + b)


def expected_task_aware(pattern, combine: str, length: int, width: int) -> torch.Tensor:
    blocks = [
        torch.full((length, width), (1.0 + i) * (2.0 if present else -3.0))
        for i, present in enumerate(pattern)
    ]
    return sum(blocks) if combine == "sum" else torch.cat(blocks)


@pytest.mark.parametrize("combine", ["sum", "concat"])
def test_hook_attaches_each_type_at_its_layers_on_target_branches_only(stream, combine) -> None:
    strategy, template = build(stream, task_aware_combine=combine)
    prompts, backbone = strategy.prompts, template.model.backbone
    distinctive_prompts(prompts)
    x, patterns = mixed_batch(stream)
    ctx = context_of(x, stream.layout)
    length, width = 16, 30
    for site in backbone.prompt_sites():
        out = per_sample_prompt(prompts.prompt_for(site, ctx), ctx.batch_size)
        if not site.is_cross:
            assert out is None, site
            continue
        branch = AVT.index(site.target)
        if site.layer == 0:  # P_target, the same for every sample
            expected = torch.full((len(patterns), length, width), 1.0 + branch)
        elif site.layer == 1:  # P_TA of the sample's pattern, the same on every branch
            expected = torch.stack(
                [expected_task_aware(p, combine, length, width) for p in patterns]
            )
        else:  # layer 2: the sample's pattern's TS prompt for this branch
            expected = torch.stack(
                [
                    torch.full((length, width), 10.0 * all_patterns(3).index(p) + branch)
                    for p in patterns
                ]
            )
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_types_sharing_a_layer_are_concatenated_in_order(stream) -> None:
    strategy, _ = build(stream, order="ts,m,ta", layers_m=[2], layers_ta=[2], layers_ts=[2])
    prompts = strategy.prompts
    distinctive_prompts(prompts)
    x, patterns = mixed_batch(stream, 1)
    ctx = context_of(x, stream.layout)
    site = next(s for s in make_backbone(stream.layout).prompt_sites() if s.is_cross)
    site = type(site)("video", "audio", 2, 30)
    out = per_sample_prompt(prompts.prompt_for(site, ctx), ctx.batch_size)
    assert out.shape == (len(patterns), 48, 30)
    for row, p in enumerate(patterns):
        assert torch.all(out[row, :16] == 10.0 * all_patterns(3).index(p) + 1)  # TS, branch v
        assert torch.all(out[row, 16:32] == 2.0)  # P_video
        torch.testing.assert_close(out[row, 32:], expected_task_aware(p, "sum", 16, 30))
    for layer in (0, 1):
        assert prompts.prompt_for(type(site)("video", "audio", layer, 30), ctx) is None


def test_back_placement_uses_the_last_layers(stream) -> None:
    backbone = make_backbone(stream.layout, config=MulTConfig(layers=5, self_layers=1))
    strategy = Ours(placement="back")
    strategy.build(context_for(stream, backbone))
    assert strategy.resolved_layers == {"m": (2,), "ta": (3,), "ts": (4,)}
    x, _ = mixed_batch(stream, 1)
    ctx = context_of(x, stream.layout)
    with_prompts = {
        s.layer for s in backbone.prompt_sites() if strategy.prompts.prompt_for(s, ctx) is not None
    }
    assert with_prompts == {2, 3, 4}


def test_a_sample_pattern_selects_its_task_specific_set_in_the_model_output(stream) -> None:
    """Changing one pattern's TS prompts changes the model output of exactly that pattern's
    samples in a mixed batch, whichever position they take."""
    strategy, template = build(stream)
    model = template.model.eval()
    x, patterns = mixed_batch(stream)
    with torch.no_grad():
        before = model(x)
        for target in (VT, A):
            chosen = strategy.prompts.task_specific_set(target)
            kept = chosen.clone()
            chosen.add_(0.5)
            after = model(x)
            changed = (after - before).abs() > 1e-7
            assert changed.tolist() == [p == target for p in patterns]
            chosen.copy_(kept)
    # Shuffled batch order: same per-sample outputs.
    permutation = torch.randperm(len(patterns), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(x[permutation]), before[permutation])


def test_oracle_identity_coincides_with_the_presence_pattern_on_these_streams(stream) -> None:
    """Every sample of a task carries exactly the task's pattern, so "oracle" == "pattern"."""
    strategy, _ = build(stream, task_identity="oracle")
    prompts = strategy.prompts
    for task in stream.tasks:
        for split in (task.train, task.test):
            x, _ = split.tensors()
            indices = prompts.pattern_indices(stream.layout.unpack(x)[1])
            assert set(indices.tolist()) == {prompts.pattern_index[task.pattern]}
    # The oracle indices, when given, override the presence mask.
    x, patterns = mixed_batch(stream, 1)
    ctx = context_of(x, stream.layout)
    site = type(make_backbone(stream.layout).prompt_sites()[0])("audio", "video", 2, 30)
    by_pattern = per_sample_prompt(prompts.prompt_for(site, ctx), ctx.batch_size)
    prompts.oracle_indices = torch.zeros(len(patterns), dtype=torch.long)  # all "full"
    forced = per_sample_prompt(prompts.prompt_for(site, ctx), ctx.batch_size)
    prompts.oracle_indices = None
    torch.testing.assert_close(forced, by_pattern[:1].expand_as(forced))


# ------------------------------------------------------------------------------------------------
# Gradients and what training may change
# ------------------------------------------------------------------------------------------------


def test_only_the_current_task_specific_set_gets_gradient(stream) -> None:
    """Even on a batch that mixes every pattern, only the experience's TS set has a gradient."""
    strategy, template = build(stream)
    model, prompts = template.model, strategy.prompts
    selector = strategy.plugins[0]
    current = stream.tasks[3].pattern

    class FakeStrategy:
        experience = type("E", (), {"current_experience": 3})()
        rebuilt = 0

        def make_optimizer(self) -> None:
            FakeStrategy.rebuilt += 1

    selector.before_training_exp(FakeStrategy())
    assert FakeStrategy.rebuilt == 1
    model.train()
    x, _ = mixed_batch(stream)
    model(x).sum().backward()
    for p in prompts.patterns:
        grad = prompts.task_specific_set(p).grad
        if p == current:
            assert grad is not None and grad.abs().sum() > 0
        else:
            assert grad is None, p
    assert all(p.grad is None for p in model.backbone.parameters())
    assert prompts.modality["audio"].grad.abs().sum() > 0
    # After the experience every method parameter counts as trainable again, stale grads gone.
    selector.after_training_exp(FakeStrategy())
    assert all(p.requires_grad for p in prompts.parameters())
    selector.before_training_exp(FakeStrategy())
    assert all(prompts.task_specific_set(p).grad is None for p in prompts.patterns if p != current)


@pytest.mark.parametrize("order", ["default", "t,av,avt,a,vt,v,at"])
def test_oracle_reads_the_task_of_each_sample_from_the_stream(tiny_dataset, order) -> None:
    """In joint training (a batch mixes tasks) the oracle gives each sample its task's pattern,
    which is also its presence pattern."""
    stream = build_stream(tiny_dataset, parse_task_order(order, AVT))
    strategy, template = build(stream, strategy_cls=JointOurs, task_identity="oracle")
    prompts = strategy.prompts
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = prompts.sample_indices

    def spy(ctx):
        assert prompts.oracle_indices is not None
        seen.append((prompts.oracle_indices.clone(), prompts.pattern_indices(ctx.presence)))
        return original(ctx)

    prompts.sample_indices = spy
    template.train(stream.avalanche_benchmark().train_stream)
    assert seen
    assert all(torch.equal(oracle, presence) for oracle, presence in seen)
    assert len(set(torch.cat([o for o, _ in seen]).tolist())) > 1  # batches mixed patterns
    assert prompts.oracle_indices is None


def test_joint_ours_trains_every_task_specific_set(stream) -> None:
    strategy, template = build(stream, strategy_cls=JointOurs)
    template.train(stream.avalanche_benchmark().train_stream)
    in_optimizer = {id(p) for g in template.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in strategy.prompts.parameters()}
    assert strategy.plugins[1].last_value is not None  # the contrastive loss was added


def test_later_tasks_leave_earlier_sets_and_the_backbone_bit_identical(stream) -> None:
    strategy, template = build(stream)
    prompts, backbone = strategy.prompts, template.model.backbone
    benchmark = stream.avalanche_benchmark()
    backbone_before = snapshot(backbone)
    initial = snapshot(prompts)
    template.train(benchmark.train_stream[0])
    first = stream.tasks[0].pattern
    after_first = prompts.task_specific_set(first).detach().clone()
    assert not torch.equal(after_first, initial[f"task_specific.{pattern_key(first)}"])
    for i in (1, 2):
        shared_before = prompts.modality["audio"].detach().clone()
        template.train(benchmark.train_stream[i])
        assert torch.equal(prompts.task_specific_set(first), after_first)
        pattern = stream.tasks[i].pattern
        assert not torch.equal(
            prompts.task_specific_set(pattern), initial[f"task_specific.{pattern_key(pattern)}"]
        )
        assert not torch.equal(prompts.modality["audio"], shared_before)  # shared prompts train
    for later in stream.tasks[3:]:  # never trained
        assert torch.equal(
            prompts.task_specific_set(later.pattern),
            initial[f"task_specific.{pattern_key(later.pattern)}"],
        )
    after = snapshot(backbone)
    assert after.keys() == backbone_before.keys()
    assert all(torch.equal(after[k], backbone_before[k]) for k in after)


# ------------------------------------------------------------------------------------------------
# The contrastive task loss
# ------------------------------------------------------------------------------------------------

Z_FIXED = {
    FULL: [1.0, 0.0, 0.0],
    VT: [0.6, 0.8, 0.0],
    AV: [0.0, 1.0, 0.0],
    AT: [0.0, 0.0, 2.0],
    A: [1.0, 1.0, 1.0],
    V: [-1.0, 0.5, 0.0],
    TX: [0.2, -0.3, 0.9],
}


def numpy_l(z: dict, i, j, tau: float) -> float:
    """l(i, j) straight from method.md, in float64."""

    def cos(u, v):
        u, v = np.asarray(u, float), np.asarray(v, float)
        return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))

    numerator = math.exp(cos(z[i], z[j]) / tau)
    denominator = sum(math.exp(cos(z[i], z[k]) / tau) for k in z if k != i)
    return -math.log(numerator / denominator)


@pytest.mark.parametrize(("tau", "beta"), [(0.5, 1.0), (0.2, 0.3), (1.0, 0.0)])
def test_contrastive_loss_matches_a_hand_computation(tau, beta) -> None:
    z = {p: torch.tensor(v, dtype=torch.float64) for p, v in Z_FIXED.items()}
    pairs = positive_pairs(AVT)
    assert pairs == [(VT, AV), (A, TX)]
    expected = 0.5 * (
        numpy_l(Z_FIXED, VT, AV, tau) + numpy_l(Z_FIXED, AV, VT, tau)
    ) + beta * 0.5 * (numpy_l(Z_FIXED, A, TX, tau) + numpy_l(Z_FIXED, TX, A, tau))
    got = contrastive_task_loss(z, tau, beta, pairs)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_contrastive_loss_one_fixed_number() -> None:
    """A second, fully literal check: the default tau and beta on the fixed vectors."""
    z = {p: torch.tensor(v, dtype=torch.float64) for p, v in Z_FIXED.items()}
    # Computed by hand (numpy, float64) from the formula of method.md.
    assert contrastive_task_loss(z, 0.5, 1.0, positive_pairs(AVT)).item() == pytest.approx(
        2.8084017, abs=1e-6
    )


def test_contrastive_loss_falls_when_positives_are_pulled_together() -> None:
    z = {p: torch.tensor(v) for p, v in Z_FIXED.items()}
    pairs = positive_pairs(AVT)
    before = contrastive_task_loss(z, 0.5, 1.0, pairs)
    pulled = dict(z)
    pulled[AV] = 0.5 * (z[AV] + z[VT])
    pulled[TX] = 0.5 * (z[TX] + z[A])
    assert contrastive_task_loss(pulled, 0.5, 1.0, pairs) < before
    # A gradient step on the z's lowers it too.
    leaf = {p: v.clone().requires_grad_(True) for p, v in z.items()}
    loss = contrastive_task_loss(leaf, 0.5, 1.0, pairs)
    loss.backward()
    stepped = {p: (v - 0.1 * v.grad).detach() for p, v in leaf.items()}
    assert contrastive_task_loss(stepped, 0.5, 1.0, pairs) < loss


def test_positive_pairs_by_pattern_for_any_number_of_modalities() -> None:
    assert positive_pairs(AVT, "vt-av,a-t") == positive_pairs(AVT)
    assert positive_pairs(AVT, "va-t") == [(AV, TX)]
    assert [set(pair) for pair in positive_pairs(("audio", "text"))] == [{(T, F_), (F_, T)}]
    four = positive_pairs(("a", "b", "c", "d"))
    assert four and all(q == (p[3], p[1], p[2], p[0]) and p != q for p, q in four)
    assert len({frozenset(pair) for pair in four}) == len(four)


def test_contrastive_plugin_adds_lambda_times_the_loss(stream) -> None:
    strategy, _ = build(stream, lam=0.25)
    plugin = strategy.plugins[1]
    prompts = strategy.prompts
    loss = contrastive_task_loss(prompts.pattern_summaries(), 0.5, 1.0, positive_pairs(AVT))

    class FakeStrategy:
        loss = torch.tensor(1.0)

    plugin.before_backward(FakeStrategy)
    assert FakeStrategy.loss.item() == pytest.approx(1.0 + 0.25 * loss.item())
    # z_k is the length-average of pattern k's task-aware prompt.
    z = prompts.pattern_summaries()
    ta = prompts.task_aware_all()
    torch.testing.assert_close(z[VT], ta[prompts.pattern_index[VT]].mean(0))
    with torch.no_grad():
        prompts.key_present.copy_(torch.linspace(0.5, 1.5, 30))
        prompts.key_missing.copy_(torch.linspace(-2.0, 1.0, 30))
    z = prompts.pattern_summaries()  # v, t present; a missing:
    manual = (
        prompts.key_missing * prompts.modality["audio"]
        + prompts.key_present * prompts.modality["video"]
        + prompts.key_present * prompts.modality["text"]
    ).mean(0)
    torch.testing.assert_close(z[VT], manual)
    assert len(build(stream, lam=0)[0].plugins) == 1
    assert len(build(stream, use_task_aware=False)[0].plugins) == 1


# ------------------------------------------------------------------------------------------------
# Task order
# ------------------------------------------------------------------------------------------------


def test_a_permuted_task_order_changes_nothing_that_depends_on_patterns(tiny_dataset) -> None:
    default = build_stream(tiny_dataset, all_patterns(3))
    permuted = build_stream(tiny_dataset, parse_task_order("t,av,avt,a,vt,v,at", AVT))
    (s1, t1), (s2, t2) = build(default), build(permuted)
    # Same prompts per pattern, same contrastive loss.
    before1, before2 = snapshot(s1.prompts), snapshot(s2.prompts)
    assert before1.keys() == before2.keys()
    assert all(torch.equal(before1[k], before2[k]) for k in before1)
    pairs = positive_pairs(AVT)
    torch.testing.assert_close(
        contrastive_task_loss(s1.prompts.pattern_summaries(), 0.5, 1.0, pairs),
        contrastive_task_loss(s2.prompts.pattern_summaries(), 0.5, 1.0, pairs),
        rtol=0,
        atol=0,
    )
    # Training the "only audio" task (index 4 here, 3 there) gives bit-identical prompts.
    i1 = [t.pattern for t in default.tasks].index(A)
    i2 = [t.pattern for t in permuted.tasks].index(A)
    assert i1 != i2
    torch.manual_seed(7)
    t1.train(default.avalanche_benchmark().train_stream[i1])
    torch.manual_seed(7)
    t2.train(permuted.avalanche_benchmark().train_stream[i2])
    after1, after2 = snapshot(s1.prompts), snapshot(s2.prompts)
    assert all(torch.equal(after1[k], after2[k]) for k in after1)
    key = f"task_specific.{pattern_key(A)}"
    assert not torch.equal(after1[key], before1[key])


# ------------------------------------------------------------------------------------------------
# Parameter share and end-to-end runs
# ------------------------------------------------------------------------------------------------


def test_trainable_share_for_the_paper_sizes(capsys) -> None:
    layout = PackedLayout(AVT, (1, 1, 1), (73, 100, 100))
    backbone = MulT(layout, MulTConfig())
    total = sum(p.numel() for p in backbone.parameters())
    options = OursOptions()
    prompts = OursPrompts(AVT, 30, options, resolve_layers(options, 5))
    model = PromptedModel(backbone, prompts)
    method = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_task = method - 6 * 3 * 16 * 30  # while training one task: one TS set of seven
    assert method == 3 * 16 * 30 + 2 * 30 + 7 * 3 * 16 * 30
    share = method / total
    with capsys.disabled():
        print(
            f"\n[ours] backbone {total} parameters; method {method} ({100 * share:.2f} %); "
            f"trained per task {per_task} ({100 * per_task / total:.2f} %)"
        )
    assert 0.005 < share < 0.05


@pytest.mark.parametrize(
    ("strategy", "options"),
    [
        ("ours", {}),
        ("ours", {"layers_ts": "2", "task_identity": "oracle", "task_aware_combine": "concat"}),
        ("joint-ours", {}),
    ],
)
def test_end_to_end_tiny_run_writes_results(tiny_config, strategy, options) -> None:
    from cmmm.running import run

    config = tiny_config(
        strategy=strategy,
        backbone_options={"layers": 3, "self_layers": 1},
        strategy_options=options,
    )
    results = run(config, log=quiet)
    on_disk = json.loads((Path(results["run_dir"]) / "results.json").read_text())
    assert on_disk["strategy"]["name"] == strategy
    assert on_disk["strategy"]["options"] == Ours(**options).options()
    # The changed default is written into the config (and so into the run key).
    assert on_disk["config"]["strategy_options"] == {"trainable_head": "pattern", **options}
    assert on_disk["strategy"]["joint"] == (strategy == "joint-ours")
    parameters = on_disk["parameters"]
    prompts = 3 * 16 * 30 + 2 * 30 + 7 * 3 * 16 * 30
    heads = 7 * (6 * 30 + 1)  # a (1 x M(M-1)d) output layer and its bias per pattern
    assert parameters["trainable"] == prompts + heads
    assert parameters["total"] == parameters["backbone"] + parameters["trainable"]
    assert 0 < parameters["trainable_share_of_backbone"] < 1
    assert on_disk["aa"] is not None


def test_checkpoints_naming_the_former_plugin_classes_still_resume(stream) -> None:
    """Checkpoints written when ours made its plugins inside functions name them so; they load."""
    from cmmm.errors import CheckpointError
    from cmmm.template_state import StreamSamples, capture_template_state, restore_template_state

    former = {
        "TaskSpecificSelector": "make_task_specific_selector",
        "ContrastiveTaskLoss": "make_contrastive_plugin",
        "OracleTaskIdentity": "make_oracle_plugin",
    }
    _, template = build(stream, task_identity="oracle")
    train_stream = stream.avalanche_benchmark().train_stream
    template.train(list(train_stream)[0])
    samples = StreamSamples(train_stream)
    state = capture_template_state(template, samples)
    for entry in state["plugins"][:3]:
        name = entry["type"].rsplit(".", 1)[1]
        entry["type"] = f"strategies.ours.{former[name]}.<locals>.{name}"
    _, fresh = build(stream, task_identity="oracle")
    restore_template_state(fresh, state, samples)
    assert torch.equal(fresh.model.prompts.seen, template.model.prompts.seen)
    state["plugins"][0]["type"] = "strategies.ours.SomethingElse"
    with pytest.raises(CheckpointError, match="another version of the strategy"):
        restore_template_state(fresh, state, samples)
