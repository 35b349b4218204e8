"""The Table-2 baselines: each runs end to end, regularisers switch on after the first task, and
replay buffers respect their size and keep every seen task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from cmmm.errors import ConfigError
from cmmm.kit.exemplars import herding_order
from cmmm.replay_sizes import BUFFER_SIZES, expand_family, paper_sizes
from cmmm.running import prepare, run
from cmmm.strategy import STRATEGIES
from strategies.agem import AveragedGEM
from strategies.der import DarkExperienceReplay
from strategies.icarl import IncrementalClassifierRepresentation
from strategies.replay import ExperienceReplay

BASELINES = ["ewc", "lwf", "si", "er-250", "agem-250", "icarl-250", "der-250"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """One root per module: the pre-trained backbones are cached once per stream."""
    return tmp_path_factory.mktemp("baselines")


def quiet(_: str) -> None:
    pass


def build(root: Path, tiny_config_at: Any, strategy: Any, stream: str = "synthetic", **kw: Any):
    """A prepared tiny run and the strategy's template, for training experience by experience."""
    config = tiny_config_at(root, stream=stream, **kw).resolved()
    prepared = prepare(config, quiet)
    template = strategy.build(prepared.strategy_context(config, plugins=[]))
    experiences = list(prepared.stream.avalanche_benchmark().train_stream)
    return template, experiences


# --------------------------------------------------------------------------------------------
# end to end through cmmm.running.run
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", ["synthetic", "synthetic-cls"])
@pytest.mark.parametrize("name", BASELINES)
def test_runs_end_to_end(root: Path, tiny_config_at: Any, name: str, stream: str) -> None:
    results = run(tiny_config_at(root, stream=stream, strategy=name), log=quiet)
    matrix = results["matrix"]
    assert len(matrix) == 7 and all(len(row) == 7 for row in matrix)
    assert all(v is not None and 0 <= v <= 100 for row in matrix for v in row)
    assert results["fm"] is not None
    # Options land in results.json with their defaults; the buffer size comes from the name.
    options = results["strategy"]["options"]
    expected = STRATEGIES.get(name).factory().options()
    if name.startswith("agem"):  # recorded as used: the memory split over the seven tasks
        expected["patterns_per_exp"] = 250 // 7
    assert options == expected and options
    if "-" in name:
        assert options["mem_size"] == int(name.split("-")[1])
    # Non-prompt baselines fine-tune the whole backbone.
    assert results["parameters"]["trainable"] == results["parameters"]["backbone"]


# --------------------------------------------------------------------------------------------
# regularisers: nothing on the first task, something after
# --------------------------------------------------------------------------------------------


def record_penalty(template: Any, plugin_type: type) -> list[tuple[int, float]]:
    """Wrap the plugin's before_backward: (experience, loss added by the plugin) per iteration."""
    (plugin,) = [p for p in template.plugins if isinstance(p, plugin_type)]
    added: list[tuple[int, float]] = []
    original = plugin.before_backward

    def wrapped(strategy: Any, **kwargs: Any) -> None:
        before = float(strategy.loss.detach())
        original(strategy, **kwargs)
        added.append((strategy.clock.train_exp_counter, float(strategy.loss.detach()) - before))

    plugin.before_backward = wrapped
    return added


def penalties_by_experience(added: list[tuple[int, float]]) -> dict[int, list[float]]:
    grouped: dict[int, list[float]] = {}
    for experience, value in added:
        grouped.setdefault(experience, []).append(value)
    return grouped


def test_ewc_penalty_is_zero_on_the_first_task_and_positive_after(root, tiny_config_at) -> None:
    from avalanche.training.plugins import EWCPlugin

    strategy = STRATEGIES.get("ewc").factory(ewc_lambda=100.0)
    # Batch 16: four updates per task, so parameters move away from the stored ones.
    template, experiences = build(root, tiny_config_at, strategy, batch_size=16)
    added = record_penalty(template, EWCPlugin)
    (plugin,) = [p for p in template.plugins if isinstance(p, EWCPlugin)]
    template.train(experiences[0])
    assert set(plugin.importances) == {0}
    assert sum(float(imp.data.sum()) for imp in plugin.importances[0].values()) > 0
    template.train(experiences[1])
    by_exp = penalties_by_experience(added)
    assert by_exp[0] and all(p == 0 for p in by_exp[0])
    assert max(by_exp[1]) > 0
    assert by_exp[1][0] == pytest.approx(0, abs=1e-6)  # first update: still at the anchor


def test_si_importances_are_not_zero_on_cpu(root, tiny_config_at) -> None:
    """Avalanche's SI snapshots parameters by view on CPU: importances would all be zero."""
    from avalanche.training.plugins import SynapticIntelligencePlugin as SIP

    strategy = STRATEGIES.get("si").factory()
    template, experiences = build(root, tiny_config_at, strategy, batch_size=16)
    (plugin,) = [p for p in template.plugins if isinstance(p, SIP)]
    template.train(experiences[0])
    importance = torch.cat([d.data for d in plugin.ewc_data[1].values()])
    assert (importance > 0).float().mean() > 0.5
    penalties = []
    original = plugin.before_backward

    def wrapped(strategy: Any, **kwargs: Any) -> None:
        original(strategy, **kwargs)
        penalties.append(
            float(SIP.compute_ewc_loss(strategy.model, plugin.ewc_data, set(), "cpu", lambd=0.1))
        )

    plugin.before_backward = wrapped
    template.train(experiences[1])
    assert penalties[0] == pytest.approx(0, abs=1e-12) and max(penalties) > 0


@pytest.mark.parametrize("stream", ["synthetic", "synthetic-cls"])
def test_lwf_distils_only_after_the_first_task(root, tiny_config_at, stream) -> None:
    from avalanche.training.plugins import LwFPlugin

    strategy = STRATEGIES.get("lwf").factory()
    template, experiences = build(root, tiny_config_at, strategy, stream=stream, batch_size=16)
    added = record_penalty(template, LwFPlugin)
    template.train(experiences[0])
    template.train(experiences[1])
    by_exp = penalties_by_experience(added)
    assert all(p == 0 for p in by_exp[0])
    assert max(by_exp[1]) > 0


# --------------------------------------------------------------------------------------------
# replay buffers
# --------------------------------------------------------------------------------------------


def buffer_contents(template: Any, family: str) -> list[Any]:
    """The datasets a replay strategy holds, whatever its own structure."""
    from avalanche.training.plugins import AGEMPlugin, ReplayPlugin

    plugins = template.plugins
    if family == "er":
        return [next(p for p in plugins if isinstance(p, ReplayPlugin)).storage_policy.buffer]
    if family == "agem":
        return list(next(p for p in plugins if isinstance(p, AGEMPlugin)).buffers)
    if family == "der":
        return [template.storage_policy.buffer]
    return list(next(p for p in plugins if hasattr(p, "exemplar_count")).memory.values())


@pytest.mark.parametrize("stream", ["synthetic", "synthetic-cls"])
@pytest.mark.parametrize(
    "family, cls",
    [
        ("er", ExperienceReplay),
        ("agem", AveragedGEM),
        ("icarl", IncrementalClassifierRepresentation),
        ("der", DarkExperienceReplay),
    ],
)
def test_buffer_respects_its_size_and_keeps_every_task(
    root, tiny_config_at, family, cls, stream
) -> None:
    size = 40  # smaller than one task's 64 samples
    template, experiences = build(root, tiny_config_at, cls(mem_size=size), stream=stream)
    for k, experience in enumerate(experiences[:3]):
        template.train(experience)
        datasets = buffer_contents(template, family)
        labels = [int(t) for d in datasets for t in d.targets_task_labels]
        assert 0 < len(labels) <= size
        assert set(labels) == set(range(k + 1)), (family, k, sorted(set(labels)))
    if family == "der" and stream == "synthetic":
        # Regression: the stored "logits" are the (B,) outputs, one number per sample.
        stored = datasets[0][0][3]
        assert stored.shape == ()


# --------------------------------------------------------------------------------------------
# iCaRL specifics
# --------------------------------------------------------------------------------------------


def test_herding_picks_distinct_samples_closest_to_the_mean_first() -> None:
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7], [1.0, 0.1]])
    order = herding_order(features, 3)
    assert order[0] == 2 and len(set(order)) == 3
    assert herding_order(features, 10) and len(herding_order(features, 10)) == 4


def test_icarl_predicts_by_nearest_mean_on_classes_and_by_head_on_regression(
    root, tiny_config_at
) -> None:
    for stream, ncm in [("synthetic-cls", True), ("synthetic", False)]:
        strategy = IncrementalClassifierRepresentation(mem_size=40)
        template, experiences = build(root, tiny_config_at, strategy, stream=stream)
        template.train(experiences[0])
        model = template.model.eval()
        x = experiences[0].dataset[0][0].unsqueeze(0)
        with torch.no_grad():
            out = model(x)
            head = model.backbone(x)
        if ncm:
            means = model.ncm.class_means
            assert means.shape[0] == 4 and out.shape == (1, 4)
            feature = torch.nn.functional.normalize(model.features(x), dim=1)
            assert torch.allclose(out, -torch.cdist(feature, means))
        else:
            assert out.shape == (1,) and torch.allclose(out, head)


# --------------------------------------------------------------------------------------------
# options and names
# --------------------------------------------------------------------------------------------


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="unknown option.*ewc_lamda.*valid options: ewc_lambda"):
        STRATEGIES.get("ewc").factory(ewc_lamda=3)
    with pytest.raises(ConfigError, match="alpha must be a number"):
        STRATEGIES.get("lwf").factory(alpha="high")
    with pytest.raises(ConfigError, match="decay_factor"):
        STRATEGIES.get("ewc").factory(mode="online")
    with pytest.raises(ConfigError, match="fixed by the name"):
        STRATEGIES.get("er-500").factory(mem_size=100)
    # The name's own size is what options() reports; it rebuilds the same strategy.
    assert STRATEGIES.get("er-500").factory(mem_size=500).options()["mem_size"] == 500
    with pytest.raises(ConfigError, match="unknown option.*size"):
        STRATEGIES.get("er-500").factory(size=100)
    with pytest.raises(ConfigError, match="must be >= 1"):
        ExperienceReplay(mem_size=0)
    assert STRATEGIES.get("der-1000").factory(beta=0).options()["beta"] == 0.0
    assert STRATEGIES.get("ewc").factory(ewc_lambda=5).options() == {
        "ewc_lambda": 5.0,
        "mode": "separate",
        "decay_factor": None,
    }


def test_icarl_nearest_mean_needs_classes(root, tiny_config_at) -> None:
    strategy = IncrementalClassifierRepresentation(classifier="ncm")
    with pytest.raises(ConfigError, match="classification"):
        build(root, tiny_config_at, strategy, stream="synthetic")


def test_every_replay_family_is_registered_at_every_size_and_expands_per_stream() -> None:
    for family in ("er", "agem", "icarl", "der"):
        for size in BUFFER_SIZES:
            assert f"{family}-{size}" in STRATEGIES
        assert family not in STRATEGIES
    assert paper_sizes("mosi") == paper_sizes("sims") == (250, 500)
    assert paper_sizes("iemocap") == (500, 1000)
    assert expand_family("er", "mosi") == ["er-250", "er-500"]
    assert expand_family("der", "iemocap") == ["der-500", "der-1000"]
    assert expand_family("ewc", "mosi") == ["ewc"]
    assert expand_family("er-1000", "mosi") == ["er-1000"]
