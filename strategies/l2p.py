"""L2P (Wang et al., CVPR 2022) on the frozen MulT. The pieces the query-based prompt baselines
share (the frozen query, ``Selection``, ``LayerPrompts``, ``QueryPromptedModel``, the task plugin,
``QueryPromptStrategy``) are ``cmmm.kit.prompt_kit``'s.

L2P: a pool of prompts, each with a learnable key. The query is the frozen backbone's pooled
feature of the input without any prompt (``MulT.forward_features``, 180-d for three modalities,
computed in eval mode and without gradient, as L2P's separate frozen "original model"). The top-N
keys by cosine similarity pick N prompts per sample, concatenated along the length; a pull term
``pull_lambda * mean_b sum_{j in top-N(b)} (1 - cos(q_b, k_j))`` is added to the loss (the same
gradient as the reference code's ``- coeff * sum(sim) / B``). Selection is per sample at training
and at test: the runner evaluates ``model(x)`` with no task label, so everything comes from x.

Published defaults and their sources:

* ``pool_size`` 10, ``prompt_length`` 5, ``top_k`` 5: the L2P paper's Split CIFAR-100 setting
  (Avalanche's ``LearningToPrompt`` uses a pool of 20). 5 x 5 = 25 prefix tokens per prompted
  layer, against 16 for the method (method.md); lower ``top_k`` or ``prompt_length`` to match.
* ``pull_lambda`` 0.1: l2p-pytorch's ``pull_constraint_coeff`` and Avalanche's
  ``sim_coefficient``.
* Prompts and keys initialised uniform(-1, 1): the reference code's "uniform" initialisers.
* ``trainable_head`` "out": L2P trains its linear classifier on top of the frozen encoder; the
  counterpart in MulT is ``out_layer`` (the last linear map of the residual head). "all" also
  trains ``proj1``/``proj2``; "none" trains the prompts and keys only.

Adaptations to MulT (which has no input tokens to prepend to, and six parallel cross-modal
transformers instead of one ViT):

* L2P prepends prompts to the input of the first layer. Here the selected prompts are prefix
  key/value tokens (the backbone's prompt hook) at the front cross-modal layer(s), ``layers``
  (default "0"): every cross-modal transformer attends to them. One pool serves all of them (a
  prompt is (L, d), d = 30); with several layers each pool entry has its own (L, d) per layer.
  The memory (self-attention) transformers get no prompt.
* Batch-wise selection (the most frequent prompts of the batch, an option of the reference code)
  is not offered: at test time it would let a batch's composition, i.e. its task, choose the
  prompts. The prompt-frequency penalty of the task-aware variant is not used either.
* Regression (MOSI, CH-SIMS) needs nothing special: the head's output and the runner's loss are
  used as they are; the pull term does not depend on the labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from cmmm.backbone import MulT
from cmmm.kit.prompt_kit import (
    TRAINABLE_HEAD,
    LayerPrompts,
    QueryPromptStrategy,
    Selection,
    cosine_matrix,
    layers_option,
    uniform_parameter,
)
from cmmm.options import Option
from cmmm.strategy import STRATEGIES, StrategyContext


class L2PPrompts(LayerPrompts):
    """A pool of ``pool_size`` prompts ((layers, L, d) each) with keys of the query's width."""

    def __init__(self, backbone: MulT, options: Mapping[str, Any]) -> None:
        super().__init__()
        self.layers: tuple[int, ...] = options["layers"]
        self.top_k: int = options["top_k"]
        self.pull_lambda: float = options["pull_lambda"]
        pool, length = options["pool_size"], options["prompt_length"]
        self.prompt = uniform_parameter(pool, len(self.layers), length, backbone.config.d_model)
        self.key = uniform_parameter(pool, backbone.feature_dim)

    def select(self, query: Tensor, task: int | None) -> Selection:
        similarity = cosine_matrix(query, self.key)  # (B, pool)
        top = similarity.topk(self.top_k, dim=1)
        chosen = self.prompt[top.indices]  # (B, N, layers, L, d)
        batch = chosen.shape[0]
        prompts = {
            layer: chosen[:, :, i].reshape(batch, -1, chosen.shape[-1])  # (B, N*L, d)
            for i, layer in enumerate(self.layers)
        }
        pull = self.pull_lambda * (1.0 - top.values).sum(dim=1).mean()
        return Selection(prompts, pull, top.indices)


@STRATEGIES.register("l2p", "L2P: a prompt pool with learnable keys picked by the frozen query")
class LearningToPrompt(QueryPromptStrategy):
    family = "l2p"
    OPTIONS = {
        "pool_size": Option(10, int, "number of prompts in the pool", minimum=1),
        "prompt_length": Option(5, int, "tokens per prompt", minimum=1),
        "top_k": Option(5, int, "prompts selected per sample", minimum=1),
        "layers": layers_option("0", "cross-modal layers given the selected prompts"),
        "pull_lambda": Option(0.1, float, "weight of the key pull term", minimum=0),
        "trainable_head": TRAINABLE_HEAD,
    }

    def check(self) -> None:
        super().check()
        self.require_at_most("top_k", "pool_size")

    def make_prompts(self, backbone: MulT, ctx: StrategyContext) -> LayerPrompts:
        return L2PPrompts(backbone, self.settings())
