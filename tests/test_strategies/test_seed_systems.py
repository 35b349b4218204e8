"""The seed papers' missing-modality methods: MemPrompt, AOEPT and ProMMA on the frozen MulT."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from cmmm.comparison import expand_strategies
from cmmm.errors import ConfigError
from cmmm.kit.modality_evaluators import ModalityEvaluators, output_shift
from cmmm.kit.orthogonal import pairwise_ortho_penalty
from cmmm.kit.prompt_kit import missing_or_every, pooled_projected_inputs
from cmmm.running import prepare, run
from cmmm.strategy import STRATEGIES
from strategies.memprompt import retrieve

NAMES = ["memprompt", "aoept", "promma"]
# Three cross-modal layers: the defaults prompt layers 0-2 (the first half of MulT's five).
TINY_BACKBONE = {"layers": 3, "self_layers": 1}
DEFAULTS: dict[str, dict[str, Any]] = {
    "memprompt": {
        "memory_size": 16,
        "top_n": 5,
        "prompt_length": 16,
        "shared_length": 16,
        "bottleneck_ratio": 16,
        "layers": "0,1,2",
        "trainable_head": "out",
    },
    "aoept": {
        "bank_size": 32,
        "prompt_length": 16,
        "layers": "0,1,2",
        "gate_reduction": 16,
        "heads": None,
        "aux_weight": 0.05,
        "shared_prompt": True,
        "kmeans_seed": 0,
        "trainable_head": "out",
    },
    "promma": {
        "prompt_length": 16,
        "layers": "0,1,2",
        "ortho_weight": 0.1,
        "evaluator": True,
        "evaluator_weight": 1.0,
        "weighting": "mi",
        "mi_weight": 0.1,
        "trainable_head": "out",
    },
}


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One root per module: the pre-trained backbones are cached once per stream."""
    return tmp_path_factory.mktemp("seed_systems")


def build(root: Path, tiny_config_at: Any, name: str, options: dict[str, Any] | None = None, **kw):
    """(strategy, template, stream, experiences) on the tiny stream, prepared as the runner does."""
    config = tiny_config_at(root, strategy=name, backbone_options=TINY_BACKBONE, **kw).resolved()
    prepared = prepare(config, quiet)
    ctx = dataclasses.replace(prepared.strategy_context(config, plugins=[]), batch_size=16)
    strategy = STRATEGIES.get(name).factory(**(options or {}))
    template = strategy.build(ctx)
    experiences = list(prepared.stream.avalanche_benchmark().train_stream)
    return strategy, template, prepared.stream, experiences


def every_pattern(stream: Any, per_task: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch mixing every task's missing pattern."""
    xs, ys = zip(*(task.test.tensors() for task in stream.tasks), strict=True)
    return torch.cat([x[:per_task] for x in xs]), torch.cat([y[:per_task] for y in ys])


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# Registration and options
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_the_documented_defaults(name: str) -> None:
    strategy = STRATEGIES.get(name).factory()
    assert strategy.options() == DEFAULTS[name]
    assert set(strategy.option_help()) == set(DEFAULTS[name])
    json.dumps(strategy.options())
    assert not strategy.joint
    assert STRATEGIES.get(name).factory(layers="[2, 0]").options()["layers"] == "0,2"
    assert name in expand_strategies("all", "mosi")


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("memprompt", {"top_n": 17}, "top_n"),
        ("memprompt", {"bottleneck_ratio": 0}, "bottleneck_ratio"),
        ("aoept", {"aux_weight": -1}, "aux_weight"),
        ("aoept", {"shared_prompt": "yes"}, "shared_prompt"),
        ("promma", {"weighting": "attention"}, "weighting"),
        ("promma", {"layers": "0,0"}, "distinct"),
    ],
)
def test_wrong_options_are_config_errors(name: str, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        STRATEGIES.get(name).factory(**options)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("memprompt", {"layers": "3"}, "layers 0..2"),
        ("aoept", {"heads": 4}, "heads=4 does not divide"),
        ("promma", {"layers": "0,5"}, "layers 0..2"),
    ],
)
def test_options_that_do_not_fit_the_backbone_fail_at_build(
    root, tiny_config_at, name, options, message
) -> None:
    with pytest.raises(ConfigError, match=message):
        build(root, tiny_config_at, name, options)


# ------------------------------------------------------------------------------------------------
# End to end, what trains and what does not
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", ["synthetic", "synthetic-cls"])
@pytest.mark.parametrize("name", NAMES)
def test_runs_end_to_end(root: Path, tiny_config_at: Any, name: str, stream: str) -> None:
    # A few tasks each, so that this file stays fast: the mixed batches below cover every
    # pattern. The classification order starts without text, so AOEPT builds text's bank late.
    order = {"synthetic": "avt,vt,a,t", "synthetic-cls": "av,at,v"}[stream]
    config = tiny_config_at(
        root, stream=stream, strategy=name, backbone_options=TINY_BACKBONE, task_order=order
    )
    results = run(config, log=quiet)
    on_disk = json.loads((Path(results["run_dir"]) / "results.json").read_text())
    assert on_disk["strategy"]["options"] == DEFAULTS[name]
    matrix = on_disk["matrix"]
    tasks = len(order.split(","))
    assert len(matrix) == tasks and all(len(row) == tasks for row in matrix)
    assert all(v is not None and 0 <= v <= 100 for row in matrix for v in row)
    assert on_disk["aa"] is not None and on_disk["fm"] is not None
    # total = backbone + the method's module; the trainable "out" head is part of the backbone.
    parameters = on_disk["parameters"]
    classes = 4 if stream == "synthetic-cls" else 1
    head = 180 * classes + classes
    assert parameters["total"] == parameters["backbone"] + parameters["trainable"] - head
    assert 0 < parameters["trainable_share_of_backbone"]


@pytest.mark.parametrize("name", NAMES)
def test_only_the_method_trains_every_part_of_it_gets_gradient_and_samples_do_not_mix(
    root, tiny_config_at, name
) -> None:
    """With the head frozen, two experiences leave the whole MulT bit-identical; on a batch mixing
    every pattern, the task loss plus the method's auxiliary loss give a gradient to every
    parameter of the method and to nothing else; and prompts follow each sample's own presence
    mask: a sample's output in that mixed batch equals its output alone."""
    strategy, template, stream, experiences = build(
        root, tiny_config_at, name, {"trainable_head": "none"}
    )
    model = template.model
    before, method_before = snapshot(model.backbone), snapshot(model.prompts)
    for experience in experiences[:2]:
        template.train(experience)
    after = snapshot(model.backbone)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(v, snapshot(model.prompts)[k]) for k, v in method_before.items())

    x, y = every_pattern(stream)
    model.train()
    model.zero_grad(set_to_none=True)
    loss = template._criterion(model(x), y)
    aux = getattr(model, "aux_loss", None)
    assert (aux is None) == (name == "memprompt")  # MemPrompt trains on the task loss only
    (loss if aux is None else loss + aux).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    without_gradient = [k for k, p in model.prompts.named_parameters() if p.grad is None]
    assert without_gradient == []

    model.eval()
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# MemPrompt
# ------------------------------------------------------------------------------------------------


def test_memprompt_retrieval_mixes_the_top_n_prompts_by_softmaxed_cosine() -> None:
    memory = torch.arange(4.0).view(4, 1, 1).expand(4, 2, 3).clone()  # prompt k is all k
    keys = torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]
    )  # cosines with the query below: 1, 0, -1, 1/sqrt(2)
    query = torch.tensor([[2.0, 0.0, 0.0]])
    prompt = retrieve(memory, keys, query, top_n=2)
    assert prompt.shape == (1, 2, 3)
    w0, w3 = math.exp(1.0), math.exp(1 / math.sqrt(2))
    expected = (0 * w0 + 3 * w3) / (w0 + w3)  # prompts 0 and 3, the two nearest keys
    torch.testing.assert_close(prompt[0], torch.full((2, 3), expected))
    # Along the second axis: cosines 0, 1, 0, 1/sqrt(2), so prompts 1 and 3.
    along_y = retrieve(memory, keys, torch.tensor([[0.0, 3.0, 0.0]]), top_n=2)
    w1 = math.exp(1.0)
    torch.testing.assert_close(along_y[0], torch.full((2, 3), (1 * w1 + 3 * w3) / (w1 + w3)))
    # top_n = K: the softmax over every cosine.
    all_four = retrieve(memory, keys, query, top_n=4)
    cosines = torch.tensor([1.0, 0.0, -1.0, 1 / math.sqrt(2)])
    weights = cosines.softmax(dim=0)
    torch.testing.assert_close(all_four[0, 0, 0], (weights * torch.arange(4.0)).sum())


def test_memprompt_sums_the_shared_prompts_of_the_missing_modalities(root, tiny_config_at) -> None:
    presence = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert missing_or_every(presence).tolist() == [[1, 1, 1], [1, 0, 0], [0, 1, 1]]
    assert missing_or_every(presence, 0.25)[0].tolist() == [0.25, 0.25, 0.25]
    _, template, stream, _ = build(root, tiny_config_at, "memprompt")
    model = template.model
    prompts = model.prompts
    x, _ = every_pattern(stream, per_task=1)
    from cmmm.kit.prompt_kit import frozen_site_tokens

    tokens = frozen_site_tokens(model.backbone, x, prompts.layers)
    _, presence = model.backbone.layout.unpack(x)
    with torch.no_grad():
        site = prompts.site_prompts(tokens, presence)[("video", "audio", 1)]
        assert site.shape == (len(x), 16 + 16, 30)
        # Sample 1 is task "vt": audio missing, so the shared prompt is G_audio(S_audio).
        assert presence[1].tolist() == [0.0, 1.0, 1.0]
        shared = prompts.maps["audio_1"](prompts.shared["1"][0])
        torch.testing.assert_close(site[1, :16], shared)
        query = tokens[("video", "audio", 1)][1:2].amax(dim=1)
        generative = retrieve(prompts.memory["audio_1"], prompts.keys["audio_1"], query, 5)
        torch.testing.assert_close(site[1:2, 16:], generative)


# ------------------------------------------------------------------------------------------------
# AOEPT
# ------------------------------------------------------------------------------------------------


def test_aoept_builds_frozen_banks_once_per_modality(root, tiny_config_at) -> None:
    _, template, _, experiences = build(root, tiny_config_at, "aoept")
    model, plugin = template.model, template.plugins[0]
    prompts = model.prompts
    assert prompts.bank_rows.tolist() == [0, 0, 0]
    template.train(experiences[0])  # every modality present: every bank is built
    assert plugin.built == {0: ["audio", "video", "text"]}
    assert prompts.bank.shape == (3, 3, 32, 30) and prompts.bank_rows.tolist() == [32, 32, 32]
    assert all(
        prompts.bank[m, layer].abs().sum(dim=1).gt(0).all() for m in range(3) for layer in range(3)
    )
    assert "bank" not in dict(prompts.named_parameters())
    bank = prompts.bank.clone()
    template.train(experiences[1])
    assert plugin.built[1] == [] and torch.equal(prompts.bank, bank)
    assert plugin.last_aux is not None and plugin.last_aux > 0  # the InfoNCE term was added

    # A modality absent from the first experience gets its bank when it first appears.
    _, template, _, experiences = build(
        root, tiny_config_at, "aoept", {"bank_size": 8}, task_order="a,avt"
    )
    template.train(experiences[0])
    assert template.model.prompts.bank_rows.tolist() == [8, 0, 0]
    audio = template.model.prompts.bank[0].clone()
    template.train(experiences[1])
    assert template.model.prompts.bank_rows.tolist() == [8, 8, 8]
    assert torch.equal(template.model.prompts.bank[0], audio)


def test_aoept_gate_is_one_without_another_modality(root, tiny_config_at) -> None:
    _, template, _, _ = build(root, tiny_config_at, "aoept")
    prompts = template.model.prompts
    pooled = {(m, layer): torch.randn(3, 30) for m in prompts.modalities for layer in (0, 1, 2)}
    presence = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    with torch.no_grad():
        gates = prompts.gate_values(pooled, presence)
    for layer in (0, 1, 2):
        torch.testing.assert_close(gates[("audio", layer)][0], torch.ones(30))  # alone
        torch.testing.assert_close(gates[("text", layer)][2], torch.ones(30))  # alone
        assert (gates[("audio", layer)][1] < 1).all()  # video present
        assert (gates[("video", layer)][0] < 1).all()  # audio present
        # The gate of text reads the mean of the present others (audio and video, sample 1).
        mean = (pooled[("audio", layer)][1] + pooled[("video", layer)][1]) / 2
        expected = torch.sigmoid(prompts.gates[2](mean))
        torch.testing.assert_close(gates[("text", layer)][1], expected)


# ------------------------------------------------------------------------------------------------
# ProMMA
# ------------------------------------------------------------------------------------------------


def test_promma_orthogonality_penalty_is_zero_exactly_for_orthogonal_prompts() -> None:
    eye = torch.eye(6)
    orthogonal = [eye[0:2], eye[2:4], eye[4:6]]  # (2, 6) each, disjoint supports
    assert pairwise_ortho_penalty(orthogonal).item() == 0.0
    rotated = torch.linalg.qr(torch.randn(6, 6))[0]
    assert pairwise_ortho_penalty([p @ rotated for p in orthogonal]).item() < 1e-10
    overlapping = [eye[0:2], eye[1:3]]  # share the direction e1
    assert pairwise_ortho_penalty(overlapping).item() == pytest.approx(1 / 4)
    assert pairwise_ortho_penalty([torch.randn(4, 6) for _ in range(3)]).item() > 0
    with pytest.raises(ConfigError, match="two prompts"):
        pairwise_ortho_penalty([eye])


def test_promma_evaluator_targets_measure_the_pseudo_label_shift() -> None:
    full = torch.tensor([[2.0], [1.0], [-1.0]])
    dropped = torch.tensor([[2.0], [0.0], [1.0]])
    assert output_shift(full, dropped, regression=True).tolist() == [0.0, 1.0, 1.0]
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    flipped = torch.tensor([[0.0, 0.0], [-10.0, 10.0]])
    targets = output_shift(logits, flipped, regression=False)
    assert targets[0] == 0.0 and targets[1] == pytest.approx(1.0, abs=1e-6)


def test_promma_scales_missing_prompts_and_weights_memory_prompts(root, tiny_config_at) -> None:
    _, template, stream, experiences = build(root, tiny_config_at, "promma")
    template.train(experiences[0])
    model = template.model.eval()
    prompts = model.prompts
    x, _ = every_pattern(stream, per_task=1)
    _, presence = model.backbone.layout.unpack(x)
    with torch.no_grad():
        logits = prompts.evaluators.logits(pooled_projected_inputs(model.backbone, x), presence)
    scales = ModalityEvaluators.scales(presence, logits)
    present = presence > 0.5
    assert torch.equal(scales[present], torch.ones(int(present.sum())))
    torch.testing.assert_close(scales[~present], torch.sigmoid(logits[~present]))
    # The orthogonality penalty vanishes when shared and private prompts are made orthogonal.
    with torch.no_grad():
        basis = torch.eye(30)
        for j in range(3):
            prompts.shared[j] = basis[0:4].repeat(4, 1)
            for m in range(3):
                prompts.private[m, j] = basis[4 + 4 * m : 8 + 4 * m].repeat(4, 1)
    assert prompts.orthogonality().item() == 0.0
    # DPW: the memory prompts of a target whose sources are both missing are weighted 1 each.
    seen: dict[str, torch.Tensor] = {}
    original = prompts.prompt_for

    def spy(site, ctx):
        prompt = original(site, ctx)
        if not site.is_cross:
            seen[site.target] = prompts.dynamic_weights(site.target)
        return prompt

    prompts.prompt_for = spy
    try:
        with torch.no_grad():
            model(x)
    finally:
        del prompts.prompt_for
    audio_only = presence.tolist().index([1.0, 0.0, 0.0])
    torch.testing.assert_close(seen["audio"][audio_only], torch.ones(2))
    for weights in seen.values():
        torch.testing.assert_close(weights.sum(dim=1), torch.full((len(x),), 2.0))
