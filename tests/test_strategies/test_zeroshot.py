"""The zero-shot reference: the pre-trained backbone, evaluated once on every task."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cmmm.errors import DataError
from cmmm.evaluation import EvalTask, Evaluator
from cmmm.results import Results
from cmmm.running import prepare, run


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_config_at) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("zeroshot")
    return {
        name: run(tiny_config_at(root, strategy=name, stream="synthetic-cls"), log=_quiet)
        for name in ("zeroshot", "naive", "joint")
    }


def test_zeroshot_is_the_pretrained_backbone_evaluated_once(runs, tiny_config_at, tmp_path) -> None:
    result = runs["zeroshot"]
    assert len(result["matrix"]) == 1 and len(result["matrix"][0]) == 7
    assert result["fm"] is None and result["bwt"] is None
    assert result["strategy"] == {"name": "zeroshot", "joint": True, "trains": False, "options": {}}
    assert result["parameters"]["trainable"] == 0
    # The same backbone, evaluated here directly, gives the same accuracies.
    config = tiny_config_at(tmp_path, strategy="zeroshot", stream="synthetic-cls").resolved()
    config.cache_dir = result["config"]["cache_dir"]  # the cached pre-training of the run
    prepared = prepare(config, _quiet)
    evaluator = Evaluator(
        [EvalTask(t.name, t.test) for t in prepared.stream.tasks],
        family="classification",
        num_classes=prepared.stream.dataset.num_classes,
        device="cpu",
    )
    direct = [m["acc"] for m in evaluator.evaluate(prepared.backbone)]
    np.testing.assert_allclose(result["matrix"][0], direct)
    assert result["aa"] == pytest.approx(float(np.mean(direct)))


def test_plots_cope_with_one_row_matrices(runs, tmp_path: Path) -> None:
    from cmmm.plotting import accuracy_heatmap, forgetting_curves, strategy_comparison

    loaded = [Results.load(Path(r["run_dir"]) / "results.json") for r in runs.values()]
    heatmap = accuracy_heatmap(loaded)
    labels = [t.get_text() for ax in heatmap.axes for t in ax.get_yticklabels()]
    assert "pre-trained only\n(zero-shot)" in labels and "trained on all\ntasks at once" in labels
    strategy_comparison(loaded)
    forgetting_curves(loaded)  # zeroshot and joint as reference lines beside naive's panel
    with pytest.raises(DataError, match="sequential"):
        forgetting_curves([loaded[0]])
