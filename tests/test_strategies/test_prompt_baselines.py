"""The prompt baselines: L2P, DualPrompt, S-Prompts, CODA-Prompt and MPLMM on the frozen MulT."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from cmmm.backbone import PromptContext, PromptSite
from cmmm.errors import ConfigError
from cmmm.kit.orthogonal import gram_schmidt_rows
from cmmm.kit.prompt_kit import cosine_matrix, frozen_query, kmeans
from cmmm.running import prepare, run
from cmmm.strategy import STRATEGIES
from strategies.codaprompt import CodaPrompts
from strategies.sprompts import nearest_domain

NAMES = ["l2p", "dualprompt", "sprompts", "codaprompt", "mplmm"]
TINY_BACKBONE = {"layers": 3, "self_layers": 1}
# Options that fit the tiny backbone's three cross-modal layers (the defaults need five).
TINY_OPTIONS: dict[str, dict[str, Any]] = {
    "l2p": {},
    "dualprompt": {"e_layers": "2"},
    "sprompts": {},
    "codaprompt": {"layers": "0,1,2"},
    "mplmm": {},
}
DEFAULTS = {
    "l2p": {
        "pool_size": 10,
        "prompt_length": 5,
        "top_k": 5,
        "layers": "0",
        "pull_lambda": 0.1,
        "trainable_head": "out",
    },
    "dualprompt": {
        "g_length": 5,
        "g_layers": "0,1",
        "e_length": 5,
        "e_layers": "2,3,4",
        "pull_lambda": 1.0,
        "trainable_head": "out",
    },
    "sprompts": {
        "prompt_length": 10,
        "layers": "0",
        "n_centroids": 5,
        "metric": "l1",
        "domain_head": "out",
        "kmeans_seed": 0,
    },
    "codaprompt": {
        "pool_size": 100,
        "prompt_length": 8,
        "layers": "0,1,2,3,4",
        "ortho_mu": 0.1,
        "trainable_head": "out",
    },
    "mplmm": {
        "prompt_length": 16,
        "type_layers": "all",
        "init": "uniform",
        "trainable_head": "out",
    },
}


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One root per module: the pre-trained backbones are cached once per stream."""
    return tmp_path_factory.mktemp("prompt_baselines")


def build(root: Path, tiny_config_at: Any, name: str, lr: float | None = None, **kw: Any):
    """(strategy, template, stream, experiences) on the tiny stream, prepared as the runner does;
    ``lr`` changes only the strategy's learning rate (pre-training keeps the default)."""
    options = kw.pop("options", TINY_OPTIONS[name])
    config = tiny_config_at(root, strategy=name, backbone_options=TINY_BACKBONE, **kw).resolved()
    prepared = prepare(config, quiet)
    ctx = prepared.strategy_context(config, plugins=[])
    if lr is not None:
        ctx = dataclasses.replace(ctx, lr=lr, batch_size=16)
    strategy = STRATEGIES.get(name).factory(**options)
    template = strategy.build(ctx)
    experiences = list(prepared.stream.avalanche_benchmark().train_stream)
    return strategy, template, prepared.stream, experiences


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_the_documented_defaults(name: str) -> None:
    strategy = STRATEGIES.get(name).factory()
    assert strategy.options() == DEFAULTS[name]
    json.dumps(strategy.options())
    assert not strategy.joint
    # Layer lists are stored in canonical form, whatever the spelling.
    if "layers" in DEFAULTS[name]:
        assert STRATEGIES.get(name).factory(layers="[2, 0]").options()["layers"] == "0,2"


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("l2p", {"pool": 3}, "unknown option.*pool_size"),
        ("l2p", {"top_k": 11}, "top_k"),
        ("l2p", {"top_k": 0}, "top_k"),
        ("l2p", {"layers": "x"}, "layers"),
        ("l2p", {"layers": "0,0"}, "distinct"),
        ("l2p", {"pull_lambda": -1}, "pull_lambda"),
        ("l2p", {"trainable_head": "proj"}, "trainable_head"),
        ("dualprompt", {"e_length": 0}, "e_length"),
        ("dualprompt", {"g_layers": ""}, "g_layers"),
        ("sprompts", {"metric": "cosine"}, "metric"),
        ("sprompts", {"domain_head": "proj1"}, "domain_head"),
        ("sprompts", {"n_centroids": 0}, "n_centroids"),
        ("codaprompt", {"ortho_mu": "high"}, "ortho_mu"),
        ("codaprompt", {"pool_size": 2.5}, "pool_size"),
        ("mplmm", {"init": "zeros"}, "init"),
        ("mplmm", {"type_layers": "-1"}, "type_layers"),
    ],
)
def test_wrong_options_are_config_errors(name: str, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        STRATEGIES.get(name).factory(**options)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("dualprompt", {}, "e_layers=2,3,4 but .* layers 0..2"),
        ("codaprompt", {}, "layers=0,1,2,3,4"),
        ("l2p", {"layers": "3"}, "layers 0..2"),
        ("codaprompt", {"layers": "0", "pool_size": 6}, "no component"),
        ("codaprompt", {"layers": "0", "pool_size": 700}, "Gram-Schmidt"),
        ("mplmm", {"type_layers": "1"}, "layers 0..0"),
    ],
)
def test_options_that_do_not_fit_the_backbone_fail_at_build(
    root, tiny_config_at, name, options, message
) -> None:
    with pytest.raises(ConfigError, match=message):
        build(root, tiny_config_at, name, options=options)


# ------------------------------------------------------------------------------------------------
# End to end, and what training may change
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", ["synthetic", "synthetic-cls"])
@pytest.mark.parametrize("name", NAMES)
def test_runs_end_to_end(root: Path, tiny_config_at: Any, name: str, stream: str) -> None:
    config = tiny_config_at(
        root,
        stream=stream,
        strategy=name,
        backbone_options=TINY_BACKBONE,
        strategy_options=TINY_OPTIONS[name],
    )
    results = run(config, log=quiet)
    on_disk = json.loads((Path(results["run_dir"]) / "results.json").read_text())
    assert on_disk["strategy"]["options"] == {**DEFAULTS[name], **TINY_OPTIONS[name]}
    matrix = on_disk["matrix"]
    assert len(matrix) == 7 and all(len(row) == 7 for row in matrix)
    assert all(v is not None and 0 <= v <= 100 for row in matrix for v in row)
    assert on_disk["fm"] is not None
    # total = backbone + the prompt module; a trainable "out" head is counted in the backbone.
    parameters = on_disk["parameters"]
    classes = 4 if stream == "synthetic-cls" else 1
    head = 0 if name == "sprompts" else 180 * classes + classes
    assert parameters["total"] == parameters["backbone"] + parameters["trainable"] - head
    assert 0 < parameters["trainable_share_of_backbone"]


@pytest.mark.parametrize("head", ["default", "frozen"])
@pytest.mark.parametrize("name", NAMES)
def test_the_backbone_is_bit_identical_after_training(root, tiny_config_at, name, head) -> None:
    """With the head frozen the whole MulT is bit-identical after two tasks; with the default
    trainable head ("out"; S-Prompts trains per-domain copies instead) only out_layer moves."""
    options = dict(TINY_OPTIONS[name])
    if head == "frozen":
        options["domain_head" if name == "sprompts" else "trainable_head"] = "none"
    strategy, template, _, experiences = build(root, tiny_config_at, name, options=options)
    model = template.model
    before = snapshot(model.backbone)
    method_before = snapshot(model.prompts)
    # What moved after either task: with L1's constant-size gradient a bias can step back to
    # exactly where it started under a fresh Adam in the second task.
    changed: set[str] = set()
    for experience in experiences[:2]:
        template.train(experience)
        after = snapshot(model.backbone)
        changed |= {k for k in before if not torch.equal(before[k], after[k])}
    head_trains = head == "default" and name != "sprompts"
    assert changed == ({"out_layer.weight", "out_layer.bias"} if head_trains else set())
    trainable = {k for k, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == ({"out_layer.weight", "out_layer.bias"} if head_trains else set())
    assert not same(method_before, snapshot(model.prompts))  # the prompts did train


def experience_rows(model: Any, experience: Any) -> set[int]:
    """The pattern rows (``PatternOutputs.rows``) of an experience's training samples."""
    x = torch.stack([experience.dataset[i][0] for i in range(len(experience.dataset))])
    return set(model.pattern_outputs.rows(model.backbone.layout.unpack(x)[1]).tolist())


@pytest.mark.parametrize("name", ["l2p", "codaprompt", "mplmm"])
def test_pattern_head_starts_as_the_frozen_head_and_keeps_old_patterns(
    root, tiny_config_at, name
) -> None:
    """trainable_head="pattern": the copies start equal to out_layer (the first prediction is the
    frozen head's), a task moves only its own pattern's copy, the backbone (out_layer included)
    stays bit-identical, and the copy of task 0's pattern is unchanged by task 1."""
    options = {**TINY_OPTIONS[name], "trainable_head": "pattern"}
    _, template, _, experiences = build(root, tiny_config_at, name, options=options)
    model = template.model
    outputs = model.pattern_outputs
    assert outputs.weight.shape[0] == 2 ** len(model.backbone.layout.modalities) - 1
    for row in range(outputs.weight.shape[0]):
        assert torch.equal(outputs.weight[row], model.backbone.out_layer.weight)
        assert torch.equal(outputs.bias[row], model.backbone.out_layer.bias)
    x = torch.stack([experiences[0].dataset[i][0] for i in range(8)])
    model.eval()
    with torch.no_grad():
        with_copies = model(x)
        model.pattern_outputs = None  # the same model reading the frozen out_layer
        frozen = model(x)
        model.pattern_outputs = outputs
    torch.testing.assert_close(with_copies, frozen)
    assert outputs.weight.requires_grad and not model.backbone.out_layer.weight.requires_grad

    backbone_before = snapshot(model.backbone)
    start = snapshot(outputs)
    template.train(experiences[0])
    after_first = snapshot(outputs)
    template.train(experiences[1])
    after_second = snapshot(outputs)
    assert same(backbone_before, snapshot(model.backbone))
    first, second = experience_rows(model, experiences[0]), experience_rows(model, experiences[1])
    assert first.isdisjoint(second)
    moved_first = {
        r
        for r in range(len(start["weight"]))
        if not torch.equal(start["weight"][r], after_first["weight"][r])
    }
    assert moved_first == first
    for row in range(len(start["weight"])):
        if row not in second:  # every other copy, task 0's included, is untouched by task 1
            assert torch.equal(after_first["weight"][row], after_second["weight"][row])
            assert torch.equal(after_first["bias"][row], after_second["bias"][row])
    assert any(not torch.equal(after_first["weight"][r], after_second["weight"][r]) for r in second)


def test_pattern_rows_follow_each_samples_presence() -> None:
    """Row = sum(present_j * 2**j) - 1: every non-empty pattern of three modalities has its own
    row, and a batch of mixed patterns reads each sample's own copy."""
    from cmmm.prompted_model import PatternOutputs

    layer = torch.nn.Linear(4, 2)
    outputs = PatternOutputs(layer, 3)
    presence = torch.tensor(
        [[a, b, c] for c in (0, 1) for b in (0, 1) for a in (0, 1) if a or b or c], dtype=bool
    )
    assert outputs.rows(presence).tolist() == list(range(7))
    with torch.no_grad():
        outputs.bias.copy_(torch.arange(7.0).unsqueeze(1).repeat(1, 2))
        outputs.weight.zero_()
    hidden = torch.randn(7, 4)
    got = outputs(hidden, presence.flip(0))
    assert got[:, 0].tolist() == list(reversed(range(7)))


def test_old_tasks_parameters_stay_bit_identical(root, tiny_config_at) -> None:
    """DualPrompt's E-prompt/key and S-Prompts' prompt/head of task 0 do not move in task 1."""
    for name in ("dualprompt", "sprompts"):
        strategy, template, _, experiences = build(root, tiny_config_at, name)
        prompts = template.model.prompts
        template.train(experiences[0])
        first = snapshot(prompts)
        template.train(experiences[1])
        second = snapshot(prompts)
        owned = [k for k in first if k.split(".")[0] in ("e_prompt", "key", "prompt", "heads")]
        for k in owned:
            index = int(k.split(".")[1])
            # Task 0 frozen in experience 1, task 1 trained there. A bias is exempt from
            # "trained means moved": under L1 its gradient has a constant size, and Adam's
            # steps of exactly lr up and down can bring it back to where the task started.
            if index == 0:
                assert torch.equal(first[k], second[k]), k
            elif index == 1 and not k.endswith("bias"):
                assert not torch.equal(first[k], second[k]), k
        assert "trained" in second and second["trained"][:2].all()


# ------------------------------------------------------------------------------------------------
# Selection from the input alone
# ------------------------------------------------------------------------------------------------


def train_single_modality_tasks(root, tiny_config_at, name, **options):
    """Three tasks with one modality each (a, v, t), whose frozen features are well separated;
    a higher learning rate so that the keys move far enough in a few steps."""
    strategy, template, stream, experiences = build(
        root, tiny_config_at, name, lr=0.1, epochs=3, task_order="a,v,t", options=options
    )
    return strategy, template, stream, experiences


def test_dualprompt_picks_each_task_e_prompt_for_its_inputs(root, tiny_config_at) -> None:
    _, template, stream, experiences = train_single_modality_tasks(
        root, tiny_config_at, "dualprompt", e_layers="2"
    )
    for experience in experiences:
        template.train(experience)
    model = template.model.eval()
    with torch.no_grad():
        for i, task in enumerate(stream.tasks):
            model(task.test.tensors()[0])
            accuracy = (model.last_choice == i).float().mean().item()
            assert accuracy >= 0.9, (task.code, accuracy)


def test_l2p_picks_prompts_trained_on_the_task_for_its_inputs(root, tiny_config_at) -> None:
    """L2P's pool is shared, so "the task's prompt" is any prompt whose key was pulled while
    training that task: every test input of a task must pick one of those, and the pull must
    have brought the chosen keys towards the queries."""
    from avalanche.core import SupervisedPlugin

    strategy, template, stream, experiences = train_single_modality_tasks(
        root, tiny_config_at, "l2p", top_k=1
    )
    model = template.model
    used: dict[int, set[int]] = {}

    class Record(SupervisedPlugin):
        def after_forward(self, s, *args, **kwargs):
            if s.clock.train_exp_epochs == 2:  # the last epoch
                chosen = set(model.last_choice.flatten().tolist())
                used.setdefault(s.experience.current_experience, set()).update(chosen)

    template.plugins.append(Record())
    queries = [frozen_query(model.backbone, task.test.tensors()[0]) for task in stream.tasks]
    keys_before = model.prompts.key.detach().clone()
    for experience in experiences:
        template.train(experience)
    model.eval()
    with torch.no_grad():
        for i, task in enumerate(stream.tasks):
            model(task.test.tensors()[0])
            chosen = model.last_choice[:, 0]
            inside = torch.tensor([c in used[i] for c in chosen.tolist()]).float().mean()
            assert inside >= 0.9, (task.code, inside, used)
            before = cosine_matrix(queries[i], keys_before).max(dim=1).values.mean()
            after = cosine_matrix(queries[i], model.prompts.key)[range(len(chosen)), chosen]
            # Random keys: cosine ~0.06 at best; pulled (pull_lambda 0.1, 12 steps): ~0.5.
            assert after.mean() > before + 0.3


def test_dualprompt_layers_get_their_own_slices_and_batches_may_mix_tasks(
    root, tiny_config_at
) -> None:
    """G on layers 0-1, E on layer 2, one (L, d) slice per (task, layer): nothing is reshaped
    across tasks or layers (the reference code's bug), and each sample gets its task's slice."""
    strategy, template, stream, _ = build(
        root, tiny_config_at, "dualprompt", options={"g_layers": "0,1", "e_layers": "1,2"}
    )
    prompts = template.model.prompts
    with torch.no_grad():
        prompts.g_prompt.copy_(torch.arange(2.0)[:, None, None].expand_as(prompts.g_prompt))
        for t, e in enumerate(prompts.e_prompt):
            e.copy_((100.0 * (t + 1) + torch.arange(2.0))[:, None, None].expand_as(e))
    query = torch.randn(3, 180)
    selection = prompts.select(query, None)
    tasks = selection.choice
    assert torch.equal(selection.prompts[0], torch.zeros(3, 5, 30))
    layer1 = selection.prompts[1]  # G then E
    assert layer1.shape == (3, 10, 30)
    assert torch.all(layer1[:, :5] == 1.0)
    for row, t in enumerate(tasks.tolist()):
        assert torch.all(layer1[row, 5:] == 100.0 * (t + 1))
        assert torch.all(selection.prompts[2][row] == 100.0 * (t + 1) + 1)
    # In training every sample gets the experience's E-prompt, and the key is pulled.
    trained = prompts.select(query, 4)
    assert torch.all(trained.prompts[2] == 501.0) and trained.aux_loss is not None
    # Only cross-modal sites receive prompts, by layer.
    prompts.current = selection.prompts
    ctx = PromptContext(torch.ones(3, 3), ("audio", "video", "text"), 3, torch.device("cpu"))
    assert prompts.prompt_for(PromptSite("audio", None, 0, 60), ctx) is None
    text_from_audio = prompts.prompt_for(PromptSite("text", "audio", 2, 30), ctx)
    assert torch.equal(text_from_audio, selection.prompts[2])
    prompts.current = None


def test_sprompts_nearest_centroid_choice_on_hand_made_data() -> None:
    centroids = torch.tensor(
        [
            [[0.0, 0.0], [0.0, 1.0]],  # domain 0
            [[5.0, 5.0], [6.0, 5.0]],  # domain 1
            [[-5.0, 0.0], [-5.0, -1.0]],  # domain 2 (not trained yet)
        ]
    )
    features = torch.tensor([[0.1, 0.9], [5.8, 5.1], [-4.9, -0.5], [4.0, 4.0]])
    valid = torch.tensor([True, True, True])
    for metric in ("l1", "l2"):
        assert nearest_domain(features, centroids, valid, metric).tolist() == [0, 1, 2, 1]
    # Untrained domains are never chosen.
    partly = torch.tensor([True, True, False])
    assert nearest_domain(features, centroids, partly, "l1").tolist() == [0, 1, 0, 1]
    # l1 and l2 differ where they should: (0, 0) is l1-nearer (2, 0), l2-nearer (1.2, 1.2).
    odd = torch.tensor([[[2.0, 0.0]], [[1.2, 1.2]]])
    point = torch.zeros(1, 2)
    both = torch.tensor([True, True])
    assert nearest_domain(point, odd, both, "l1").tolist() == [0]
    assert nearest_domain(point, odd, both, "l2").tolist() == [1]


def test_kmeans_finds_separated_clusters_and_is_seeded() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(20, 2, generator=generator) for c in centres])
    found = kmeans(points, 3, seed=1)
    assert found.shape == (3, 2)
    distances = torch.cdist(centres, found)
    assert distances.min(dim=1).values.max() < 0.2
    assert torch.equal(found, kmeans(points, 3, seed=1))
    assert kmeans(points[:2], 5).shape == (2, 2)  # fewer points than centroids


def test_sprompts_picks_each_domain_for_its_test_inputs(root, tiny_config_at) -> None:
    _, template, stream, experiences = build(root, tiny_config_at, "sprompts", task_order="a,v,t")
    for experience in experiences:
        template.train(experience)
    model = template.model.eval()
    assert model.prompts.trained.tolist() == [True, True, True]
    with torch.no_grad():
        for i, task in enumerate(stream.tasks):
            model(task.test.tensors()[0])
            assert (model.last_choice == i).float().mean() >= 0.9, task.code


# ------------------------------------------------------------------------------------------------
# CODA-Prompt
# ------------------------------------------------------------------------------------------------


def test_gram_schmidt_rows_are_orthonormal_to_earlier_rows() -> None:
    previous = torch.randn(5, 12, dtype=torch.float64)
    rows = gram_schmidt_rows(previous, 4)
    assert rows.shape == (4, 12)
    torch.testing.assert_close(rows @ rows.T, torch.eye(4, dtype=torch.float64))
    assert (rows @ previous.T).abs().max() < 1e-10
    with pytest.raises(ConfigError, match="do not fit"):
        gram_schmidt_rows(previous, 8)


def test_codaprompt_old_slices_stay_bit_identical_and_new_slices_start_orthogonal(
    root, tiny_config_at
) -> None:
    strategy, template, _, experiences = build(root, tiny_config_at, "codaprompt")
    prompts: CodaPrompts = template.model.prompts
    template.train(experiences[0])
    after_first = snapshot(prompts)
    penalty = template.plugins[0].last_aux
    assert penalty is not None and penalty >= 0  # the orthogonality term was added
    template.train(experiences[1])
    after_second = snapshot(prompts)
    for k in after_first:
        if k.startswith(("components.0", "keys.0", "attention.0")):
            assert torch.equal(after_first[k], after_second[k]), k
        if k.startswith(("components.1", "keys.1", "attention.1")):
            assert not torch.equal(after_first[k], after_second[k]), k
    # The next slice starts orthonormal to every earlier one (per layer, for K, A and P).
    prompts.begin_task(2)
    for group in (prompts.components, prompts.keys, prompts.attention):
        for layer in range(3):
            new = group[2][layer].flatten(1).double()
            old = torch.cat([group[s][layer].flatten(1) for s in (0, 1)]).double()
            torch.testing.assert_close(new @ new.T, torch.eye(len(new), dtype=torch.float64))
            assert (new @ old.T).abs().max() < 1e-5
    assert [p.requires_grad for p in prompts.keys[:3]] == [False, False, True]
    # At test the slices of every trained task are used (two here), in training 0..t.
    assert prompts.active_slices(None) == 2 and prompts.active_slices(4) == 5


# ------------------------------------------------------------------------------------------------
# MPLMM
# ------------------------------------------------------------------------------------------------


def test_mplmm_fills_missing_blocks_and_prompts_the_memory_stage(root, tiny_config_at) -> None:
    strategy, template, stream, _ = build(root, tiny_config_at, "mplmm")
    model = template.model.eval()
    prompts = model.prompts
    layout = model.backbone.layout
    x = torch.cat([task.test.tensors()[0][:2] for task in stream.tasks])  # every pattern
    features, presence = layout.unpack(x)
    completed, completed_presence = layout.unpack(model.complete_input(x))
    assert torch.equal(completed_presence, presence)
    for i, m in enumerate(layout.modalities):
        present = presence[:, i] > 0.5
        torch.testing.assert_close(
            completed[m][present], features[m][present] + prompts.signal_present[m]
        )
        missing = completed[m][~present] - prompts.signal_missing[m]
        assert missing.abs().sum() > 0  # generated, no longer the zero fill
        assert (missing >= -0.2).all()  # a GELU output
    # Missing-type prompts: memory sites only, one per missing case.
    raw = prompts.type_prompts(presence, model.backbone.projections)
    assert raw["audio"].shape == (len(x), 16, 60)
    case = prompts.pattern_indices(presence)
    assert torch.equal(raw["audio"][0], raw["audio"][1])  # same case
    assert not torch.equal(raw["audio"][0], raw["audio"][2])  # other case
    assert len(set(case.tolist())) == 7
    seen: dict[str, Any] = {}
    original = prompts.prompt_for

    def spy(site, ctx):
        seen[site.name] = original(site, ctx)
        return seen[site.name]

    prompts.prompt_for = spy
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        del prompts.prompt_for
    assert out.shape == (len(x),)
    assert {k for k, v in seen.items() if v is not None} == {
        f"{m}_self_0" for m in layout.modalities
    }
    # A sample's output does not depend on the other samples of the batch.
    with torch.no_grad():
        torch.testing.assert_close(model(x[3:5]), out[3:5])
