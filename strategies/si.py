"""SI, Synaptic Intelligence (Zenke et al., 2017): Avalanche's ``SynapticIntelligencePlugin``.

Each parameter's importance is its contribution to the drop of the loss along the training
trajectory (sum of -gradient x update), divided by its squared total change on the task plus
``eps``; later tasks add ``si_lambda / 2 * sum importance * (theta - theta_prev)^2`` to the loss.
Avalanche's version (from Maltoni & Lomonaco's CWR+ code) also clips importances at 1e-3.

A fix for CPU runs: Avalanche snapshots parameters with ``param.detach().cpu().flatten()``,
which on a CPU model is a view of the live parameter, not a copy. The "old" weights then always
equal the current ones: every path integral, importance and penalty is exactly zero and SI
silently trains like naive fine-tuning. ``SnapshottingSI`` copies the two snapshots that must
outlive the next optimizer step (the weights at the start of a task and before each update); on
CUDA ``.cpu()`` already copied and nothing changes.

Defaults ``si_lambda = 0.1`` and ``eps = 0.1``: Avalanche's reference reproduction of SI on
Permuted MNIST (ContinualAI/continual-learning-baselines), a domain-incremental benchmark like
ours, following Zenke et al.'s c = 0.1 for Permuted MNIST.
"""

from __future__ import annotations

import warnings
from typing import Any

from cmmm.options import ConfigurableStrategy, Option
from cmmm.strategy import STRATEGIES, StrategyContext


def snapshotting_si(si_lambda: float, eps: float) -> Any:
    """Avalanche's SI plugin with real copies of the parameter snapshots (see module doc)."""
    from avalanche.training.plugins import SynapticIntelligencePlugin

    class SnapshottingSI(SynapticIntelligencePlugin):
        @staticmethod
        def _copy(params: dict[str, Any]) -> None:
            for data in params.values():
                data.data = data.data.clone()

        def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            super().before_training_exp(strategy, **kwargs)
            self._copy(self.ewc_data[0])  # weights at the start of the task (penalty anchor)

        def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
            super().before_training_iteration(strategy, **kwargs)
            self._copy(self.syn_data["old_theta"])  # weights before this update

        def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            # Avalanche applies np.square to tensors: one NumPy 2 deprecation warning per tensor.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "__array_wrap__", DeprecationWarning)
                super().after_training_exp(strategy, **kwargs)

    return SnapshottingSI(si_lambda=si_lambda, eps=eps)


@STRATEGIES.register("si", "SI: fine-tune the whole MulT with path-integral importances")
class SynapticIntelligence(ConfigurableStrategy):
    family = "si"
    OPTIONS = {
        "si_lambda": Option(0.1, float, "weight of the SI penalty (c)", minimum=0),
        "eps": Option(0.1, float, "damping added to the squared parameter change (xi)", minimum=0),
    }

    def build(self, ctx: StrategyContext) -> Any:
        from avalanche.training import Naive

        kwargs = ctx.template_kwargs()
        kwargs["plugins"].append(snapshotting_si(self.opt("si_lambda"), self.opt("eps")))
        # Naive + SynapticIntelligencePlugin is exactly avalanche.training.SynapticIntelligence.
        return Naive(model=ctx.model, optimizer=ctx.adam(ctx.model.parameters()), **kwargs)
