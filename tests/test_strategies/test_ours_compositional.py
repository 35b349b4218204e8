"""`ours-compositional` and streams with more than three modalities."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_ours import build, context_for, make_backbone

from cmmm.backbone import MulT, MulTConfig
from cmmm.data.missing_stream import build_stream
from cmmm.data.patterns import all_patterns
from cmmm.running import run
from cmmm.strategy import STRATEGIES
from strategies.ours import Ours, OursOptions, OursPrompts
from strategies.ours_compositional import CompositionalStore
from streams.synthetic import SyntheticSpec, make_synthetic

WIDTH, LENGTH = 30, 4
NAMES = ("audio", "video", "text", "depth", "thermal")


def quiet(_: str) -> None:
    pass


def synthetic_options(m: int) -> dict:
    """A tiny synthetic stream with ``m`` modalities (15 tasks for 4, 31 for 5)."""
    return {
        "modalities": list(NAMES[:m]),
        "seq_lens": [3] * m,
        "feature_dims": [6] * m,
        "signal": [0.6, 0.3, 0.7, 0.5, 0.4][:m],
        "n_train": 48,
        "n_valid": 16,
        "n_test": 32,
    }


def layers_all_at_zero() -> dict[str, list[int]]:
    return {"layers_m": [0], "layers_ta": [0], "layers_ts": [0]}


@pytest.mark.parametrize("m", [3, 4, 5])
def test_task_specific_parameters_grow_linearly_not_exponentially(m: int) -> None:
    modalities = NAMES[:m]
    layers = {"m": (0,), "ta": (1,), "ts": (2,)}
    per_pattern = OursPrompts(modalities, WIDTH, OursOptions(prompt_length=LENGTH), layers)
    options = OursOptions(prompt_length=LENGTH, task_specific_form="compositional")
    composed = OursPrompts(modalities, WIDTH, options, layers)

    def count(prompts: OursPrompts) -> int:
        return sum(p.numel() for p in prompts.task_specific_parameters())

    one_set = m * LENGTH * WIDTH  # one prompt per target branch
    assert count(per_pattern) == (2**m - 1) * one_set
    assert count(composed) == 2 * m * one_set
    # Every pattern has a set, and it is the sum of its modalities' components.
    sets = composed.task_specific_all()
    assert sets.shape == (2**m - 1, m, LENGTH, WIDTH)
    for k, pattern in enumerate(composed.patterns):
        expected = sum(
            composed.task_specific[f"{name}_{'present' if present else 'missing'}"]
            for name, present in zip(modalities, pattern, strict=True)
        )
        torch.testing.assert_close(sets[k], expected)


@pytest.fixture
def stream4():
    dataset = make_synthetic(SyntheticSpec(**synthetic_options(4)))
    return build_stream(dataset, all_patterns(4))


def snapshot(prompts: OursPrompts) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in prompts.task_specific.items()}


@pytest.mark.parametrize("update", ["current", "unused"])
def test_only_the_allowed_components_change(stream4, update: str) -> None:
    strategy, template = build(
        stream4, Ours, task_specific_form="compositional", compositional_update=update
    )
    prompts = strategy.prompts
    assert isinstance(prompts.store, CompositionalStore)
    experiences = list(stream4.avalanche_benchmark().train_stream)
    trained: set[str] = set()
    for step in range(3):
        pattern = stream4.tasks[step].pattern
        before = snapshot(prompts)
        template.train(experiences[step])
        after = snapshot(prompts)
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        mine = set(prompts.store.components(pattern))
        allowed = mine if update == "current" else mine - trained
        assert changed == allowed, (step, changed, allowed)
        trained |= mine


def test_backbone_stays_frozen_with_four_modalities(stream4) -> None:
    backbone = make_backbone(stream4.layout)
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    strategy = STRATEGIES.get("ours-compositional").factory()
    template = strategy.build(context_for(stream4, backbone))
    for experience in list(stream4.avalanche_benchmark().train_stream)[:2]:
        template.train(experience)
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("strategy", ["ours", "ours-compositional", "naive"])
def test_four_and_five_modality_streams_run_end_to_end(
    tmp_path: Path, tiny_config_at, strategy: str
) -> None:
    for m in (4, 5):
        config = tiny_config_at(
            tmp_path / str(m),
            stream_options=synthetic_options(m),
            strategy=strategy,
            strategy_options={} if strategy == "naive" else layers_all_at_zero(),
        )
        results = run(config, log=quiet)
        tasks = 2**m - 1
        assert len(results["stream"]["tasks"]) == tasks
        assert len(results["matrix"]) == tasks and len(results["matrix"][0]) == tasks
        assert results["aa"] is not None and results["fm"] is not None


def test_mult_and_patterns_for_any_number_of_modalities() -> None:
    for m in (2, 4, 5):
        patterns = all_patterns(m)
        assert len(patterns) == 2**m - 1 and len(set(patterns)) == len(patterns)
        assert patterns[0] == (True,) * m
        dataset = make_synthetic(SyntheticSpec(**synthetic_options(max(m, 2))))
        stream = build_stream(dataset, all_patterns(len(dataset.modalities)))
        model = MulT(stream.layout, MulTConfig(layers=1, self_layers=1))
        x, _ = stream.tasks[0].test.tensors()
        assert model(x[:5]).shape == (5,)
