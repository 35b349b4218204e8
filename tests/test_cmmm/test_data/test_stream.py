"""The missing-modality stream: seven patterned tasks, packed samples, an Avalanche benchmark."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from cmmm.backbone import MulT, MulTConfig
from cmmm.data.missing_stream import build_stream, layout_of
from cmmm.data.patterns import all_patterns, parse_task_order
from cmmm.errors import ConfigError

TINY_MULT = MulTConfig(layers=1, self_layers=1)
DEFAULT_NAMES = [
    "a·v·t",
    "v·t, a missing",
    "a·v, t missing",
    "a·t, v missing",
    "a, v·t missing",
    "v, a·t missing",
    "t, a·v missing",
]


@pytest.fixture(scope="module")
def stream(tiny_dataset):
    return build_stream(tiny_dataset, all_patterns(3))


def blocks(x: torch.Tensor, layout) -> list[torch.Tensor]:
    """Split packed samples (B, size) into per-modality blocks and the presence flags."""
    return list(torch.split(x, [*layout.block_sizes, len(layout.modalities)], dim=1))


def original_blocks(dataset, split: str, layout) -> list[torch.Tensor]:
    data = getattr(dataset, split)
    return [torch.from_numpy(data.features[m]).reshape(len(data), -1) for m in layout.modalities]


def test_seven_tasks_in_default_order_with_names(stream, tiny_dataset) -> None:
    assert len(stream.tasks) == 7
    assert stream.patterns == all_patterns(3)
    assert [t.index for t in stream.tasks] == list(range(7))
    assert [t.name for t in stream.tasks] == DEFAULT_NAMES
    assert [t.code for t in stream.tasks] == ["avt", "vt", "av", "at", "a", "v", "t"]
    assert stream.task_data == "full"
    assert stream.layout == layout_of(tiny_dataset)
    assert stream.layout.seq_lens == (4, 3, 5)
    assert stream.layout.feature_dims == (12, 16, 20)


@pytest.mark.parametrize("split", ["train", "valid", "test"])
def test_tasks_apply_their_pattern(stream, tiny_dataset, split: str) -> None:
    layout = stream.layout
    originals = original_blocks(tiny_dataset, split, layout)
    labels = torch.as_tensor(getattr(tiny_dataset, split).labels)
    for task in stream.tasks:
        x, y = getattr(task, split).tensors()
        assert x.shape == (len(labels), layout.size)
        assert torch.equal(y, labels)
        parts = blocks(x, layout)
        assert torch.equal(
            parts[-1], torch.tensor(task.pattern, dtype=torch.float32).expand(len(labels), -1)
        )
        for i, present in enumerate(task.pattern):
            if present:
                assert torch.equal(parts[i], originals[i]), (task.name, i)
            else:
                assert torch.count_nonzero(parts[i]) == 0, (task.name, i)


def test_getitem_matches_tensors(stream) -> None:
    for task in stream.tasks:
        xs, ys = task.test.tensors()
        for i in (0, 5, len(task.test) - 1):
            x, y = task.test[i]
            assert torch.equal(x, xs[i])
            assert torch.equal(y, ys[i])


def test_full_task_data_gives_every_task_the_whole_train_split(stream, tiny_dataset) -> None:
    n = len(tiny_dataset.train)
    for task in stream.tasks:
        assert len(task.train) == n
        assert torch.equal(task.train.indices, torch.arange(n))


def test_disjoint_task_data_partitions_the_train_split(tiny_dataset) -> None:
    stream = build_stream(tiny_dataset, all_patterns(3), task_data="disjoint", seed=3)
    n = len(tiny_dataset.train)
    parts = [set(t.train.indices.tolist()) for t in stream.tasks]
    assert all(parts), "every task gets some samples"
    assert sum(len(p) for p in parts) == n
    assert set().union(*parts) == set(range(n))
    for a in range(7):
        for b in range(a + 1, 7):
            assert not parts[a] & parts[b]
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    # The samples are the right ones, under the task's pattern.
    layout = stream.layout
    originals = original_blocks(tiny_dataset, "train", layout)
    labels = torch.as_tensor(tiny_dataset.train.labels)
    for task in stream.tasks:
        x, y = task.train.tensors()
        assert torch.equal(y, labels[task.train.indices])
        parts_x = blocks(x, layout)
        for i, present in enumerate(task.pattern):
            expected = originals[i][task.train.indices] if present else 0 * parts_x[i]
            assert torch.equal(parts_x[i], expected)
        # Test and valid splits stay whole.
        assert len(task.test) == len(tiny_dataset.test)
    # The partition depends on the seed.
    other = build_stream(tiny_dataset, all_patterns(3), task_data="disjoint", seed=4)
    assert [set(t.train.indices.tolist()) for t in other.tasks] != parts


def test_unknown_task_data_is_rejected(tiny_dataset) -> None:
    with pytest.raises(ConfigError, match="full.*disjoint"):
        build_stream(tiny_dataset, all_patterns(3), task_data="overlap")  # type: ignore[arg-type]


def test_patterns_that_do_not_fit_are_rejected(tiny_dataset) -> None:
    with pytest.raises(ConfigError):
        build_stream(tiny_dataset, [(True, True)])
    with pytest.raises(ConfigError):
        build_stream(tiny_dataset, [(False, False, False)])


def test_permuted_order_gives_the_same_per_pattern_test_data(stream, tiny_dataset) -> None:
    order = parse_task_order("t,at,avt,v,vt,a,av", tiny_dataset.modalities)
    permuted = build_stream(tiny_dataset, order)
    assert [t.code for t in permuted.tasks] == ["t", "at", "avt", "v", "vt", "a", "av"]
    by_pattern = {t.pattern: t for t in stream.tasks}
    for task in permuted.tasks:
        reference = by_pattern[task.pattern]
        assert task.name == reference.name
        for split in ("train", "valid", "test"):
            x, y = getattr(task, split).tensors()
            x_ref, y_ref = getattr(reference, split).tensors()
            assert torch.equal(x, x_ref)
            assert torch.equal(y, y_ref)


def test_subset_order(tiny_dataset) -> None:
    sub = build_stream(tiny_dataset, parse_task_order("vt,avt", tiny_dataset.modalities))
    assert [t.code for t in sub.tasks] == ["vt", "avt"]
    assert [t.index for t in sub.tasks] == [0, 1]


def test_full_train_and_valid_have_every_modality(stream, tiny_dataset) -> None:
    layout = stream.layout
    for split, ds in (("train", stream.full_train()), ("valid", stream.full_valid())):
        x, y = ds.tensors()
        parts = blocks(x, layout)
        assert torch.equal(parts[-1], torch.ones(len(y), 3))
        for i, original in enumerate(original_blocks(tiny_dataset, split, layout)):
            assert torch.equal(parts[i], original)


def test_label_dtypes(stream) -> None:
    from streams.synthetic import SyntheticSpec, make_synthetic

    data = make_synthetic(SyntheticSpec(task_type="classification", n_train=16, n_test=16))
    cls_stream = build_stream(data, all_patterns(3))
    assert cls_stream.tasks[0].train.labels.dtype == torch.long
    assert stream.tasks[0].train.labels.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Avalanche
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def benchmark(stream):
    return stream.avalanche_benchmark()


def test_benchmark_has_seven_train_and_test_experiences(benchmark) -> None:
    assert len(benchmark.train_stream) == 7
    assert len(benchmark.test_stream) == 7


def test_benchmark_samples_are_x_y_task_label(benchmark, stream) -> None:
    for index, (train_exp, test_exp) in enumerate(
        zip(benchmark.train_stream, benchmark.test_stream, strict=True)
    ):
        task = stream.tasks[index]
        assert train_exp.current_experience == index
        assert len(train_exp.dataset) == len(task.train)
        assert len(test_exp.dataset) == len(task.test)
        assert set(train_exp.dataset.targets_task_labels) == {index}
        assert set(test_exp.dataset.targets_task_labels) == {index}
        for exp, ds in ((train_exp, task.train), (test_exp, task.test)):
            sample = exp.dataset[3]
            assert len(sample) == 3
            x, y, t = sample
            assert isinstance(x, torch.Tensor) and x.shape == (stream.layout.size,)
            assert t == index
            x_ref, y_ref = ds[3]
            assert torch.equal(x, x_ref)
            assert torch.equal(torch.as_tensor(y), y_ref)
            # The pattern is visible in the packed flags.
            assert x[-3:].tolist() == [float(p) for p in task.pattern]


def _template(name: str, model: nn.Module, **extra):
    from avalanche.training import EWC, Naive, Replay
    from avalanche.training.plugins import EvaluationPlugin

    cls = {"naive": Naive, "replay": Replay, "ewc": EWC}[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(
            model=model,
            optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
            criterion=nn.L1Loss(),
            train_mb_size=32,
            train_epochs=1,
            eval_mb_size=64,
            device="cpu",
            evaluator=EvaluationPlugin(loggers=[]),
            **extra,
        )


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], model: nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("name", "extra"),
    [("naive", {}), ("replay", {"mem_size": 20}), ("ewc", {"ewc_lambda": 1.0})],
)
def test_avalanche_strategies_consume_the_stream(benchmark, stream, name: str, extra) -> None:
    torch.manual_seed(0)
    model = MulT(stream.layout, TINY_MULT)
    template = _template(name, model, **extra)
    for experience in list(benchmark.train_stream)[:2]:
        before = _snapshot(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            template.train(experience)
        assert _changed(before, model), f"{name}: experience {experience.current_experience}"
    if name == "replay":
        from avalanche.training.plugins import ReplayPlugin

        plugin = next(p for p in template.plugins if isinstance(p, ReplayPlugin))
        buffer = plugin.storage_policy.buffer
        assert 0 < len(buffer) <= 20
        assert {int(buffer[i][2]) for i in range(len(buffer))} == {0, 1}
    if name == "ewc":
        from avalanche.training.plugins import EWCPlugin

        plugin = next(p for p in template.plugins if isinstance(p, EWCPlugin))
        assert set(plugin.importances) >= {0, 1}
    # The trained model still maps packed samples to one regression output each.
    x, _ = stream.tasks[0].test.tensors()
    model.eval()
    with torch.no_grad():
        out = model(x[:4])
    assert out.shape == (4,)
    assert torch.isfinite(out).all()
