"""ProMMA ("Evaluation Before Generation: A Paradigm for Robust Multimodal Sentiment Analysis with
Missing Modalities", ICME 2026; seed ``000_1bc230320942b0bd``) on the frozen MulT, trained task
after task like every other baseline (it has no continual mechanism).

**The lowest-fidelity reconstruction of the seed methods.** The seed is the abstract alone and
the public repository (``rongfei-chen/ProMMA``) holds no code. The abstract names four modules
and what each is for; how each works is reconstructed here, each part cheap, deterministic and
batch-independent at test time (a sample's prediction never depends on the rest of its batch).

Taken from the abstract (what each module is for, where it acts):

1. Missing Modality Evaluator (MME): at the input, decides per sample whether generating a
   missing modality helps, "using pre-trained models and pseudo labels", to avoid low-quality
   imputation.
2. Modality-invariant Prompt Disentanglement (MiPD): shared prompts decomposed into
   modality-private prompts.
3. Dynamic Prompt Weighting (DPW): mutual-information-based weights computed from cross-attention
   outputs, suppressing interference from missing modalities.
4. Multi-level Prompt Dynamic Connection (MPDC): shared prompts joined to self-attention outputs
   through residual connections, at several levels.

Reconstructed (every weight below is an option; defaults [R] are this file's choices):

* MiPD: per prompted cross-modal layer l, a shared prompt S_l and one private prompt P_(m,l) per
  modality (L x d each, N(0, 0.02), L = 16 as the method's prompts). The cross-modal transformer
  target t <- source s at layer l gets the prefix [S_l ; c_s P_(s,l)]: the private prompt of the
  modality whose tokens are the keys/values there (as MemPrompt's placement). "Decomposed" is
  read as MISA's shared/private split: an orthogonality penalty sum_(pairs) mean((A B^T)^2) over
  {S_l, P_(m,l)} keeps the private prompts out of each other's and the shared prompt's span
  (``ortho_weight`` 0.1).
* MME: "generating" a missing modality s is its private prompt standing in for its tokens. The
  evaluator (per modality, an MLP d -> d -> 1 on the mean time-pooled projected tokens of the
  present other modalities) gives e_s in (0, 1), and c_s = e_s for a missing s (1 when present):
  a soft, detached decision, so only the evaluator's own loss trains it. Pseudo-labels come from
  the frozen pre-trained backbone: on training samples where s is present together with another
  modality, the target is how far the frozen model's output moves away from its own output on
  the sample (the pseudo-label) when s is removed: |y - y'| / (|y| + |y'|) for regression, the
  total-variation distance of the softmaxes for classification, both in [0, 1]; binary
  cross-entropy, weight ``evaluator_weight`` 1.0. This costs M + 1 prompt-free passes of the
  frozen backbone per training minibatch (none at test). ``evaluator`` false: c_s = 1.
* DPW: the cross-attention outputs are the cross-modal transformers' outputs, read with forward
  hooks during the prompted pass (they are complete before the memory transformer of their
  target asks for prompts). The MI estimate is an InfoNCE critic (a standard MI lower bound):
  score(u, v) = <W_u u, W_v v> / sqrt(d), u the time-mean of the output of t <- s (detached), v
  the time-mean of s's projected tokens (zero when s is missing, so its score is 0). The critic is
  trained by InfoNCE over the samples where s is present (``mi_weight`` 0.1); the weights are
  omega_(t<-s) = (M-1) softmax_s(score), detached (1 each with ``weighting`` "uniform").
* MPDC: every memory (self-attention) layer k of target t gets the prefix
  concat_s(omega_(t<-s) G_k) along features (each source's slice of the memory width), with
  G_k = mean_l S_l + R_k: the shared prompts' global prior plus a learnable residual per level
  (zero-initialised), attended by the self-attention whose output joins the stream through the
  layer's residual connection.
* Layers: the first half of the cross-modal layers ("0,1,2" of 5) and every memory layer. No
  backbone weight is modified and every prompt enters through the backbone's hook.
* ``trainable_head`` "out", as the other prompt baselines (MulT's ``out_layer`` trains).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmmm.backbone import MulT, PromptContext, PromptSite
from cmmm.errors import ConfigError
from cmmm.options import Option
from cmmm.prompt_kit import (
    TRAINABLE_HEAD,
    PromptStrategy,
    aux_loss_plugin,
    frozen_query,
    layers_option,
)
from cmmm.prompted_model import PromptedModel
from cmmm.strategy import STRATEGIES, StrategyContext

WEIGHTINGS = ("mi", "uniform")


def orthogonality_penalty(prompts: Sequence[Tensor]) -> Tensor:
    """sum over pairs i < j of mean((A_i A_j^T)^2) for prompts A_i of shape (L_i, d): zero exactly
    when every token of each prompt is orthogonal to every token of every other one."""
    if len(prompts) < 2:
        raise ConfigError("the orthogonality penalty needs at least two prompts")
    total = prompts[0].new_zeros(())
    for i in range(len(prompts)):
        for j in range(i + 1, len(prompts)):
            total = total + (prompts[i] @ prompts[j].T).pow(2).mean()
    return total


def evaluator_targets(full: Tensor, dropped: Tensor, regression: bool) -> Tensor:
    """(B,) in [0, 1]: how far the frozen model's output moves from its pseudo-label ``full``
    (its output on the sample as given, (B, out)) to ``dropped`` (with one modality removed)."""
    if regression:
        a, b = full[:, 0], dropped[:, 0]
        return (a - b).abs() / (a.abs() + b.abs()).clamp(min=1e-6)
    return 0.5 * (full.softmax(dim=1) - dropped.softmax(dim=1)).abs().sum(dim=1)


def frozen_output(backbone: MulT, x: Tensor) -> Tensor:
    """(B, output_dim): the frozen pre-trained backbone's output without prompts (eval mode, no
    gradient; ``frozen_query`` restores every module's mode, this restores the head's flag)."""
    features = frozen_query(backbone, x)
    was_training = backbone.training
    backbone.training = False  # MulT.head reads its own flag for the output dropout
    try:
        with torch.no_grad():
            return backbone.head(features)
    finally:
        backbone.training = was_training


@dataclass
class ProMMABatch:
    """The current batch: (B, M) private-prompt scales c, (B, M, d) time-pooled projected inputs,
    the evaluators' (B, M) logits (None without evaluators) and the presence mask, (target,
    source) -> (B, L, d) cross-modal outputs as they are produced, and target -> (B, M-1) DPW
    weights once computed."""

    scales: Tensor
    pooled: Tensor
    logits: Tensor | None
    presence: Tensor
    cross_outputs: dict[tuple[str, str], Tensor] = field(default_factory=dict)
    memory_weights: dict[str, Tensor] = field(default_factory=dict)


class ProMMAPrompts(nn.Module):
    """Shared, private and per-level residual prompts, the evaluators and the MI critic; the
    state of the current batch (``current``, a ``ProMMABatch``) feeds ``prompt_for``."""

    def __init__(self, backbone: MulT, options: Mapping[str, Any]) -> None:
        super().__init__()
        self.modalities = tuple(backbone.layout.modalities)
        self.layers: tuple[int, ...] = options["layers"]
        self.width = width = backbone.config.d_model
        length, memory_layers = options["prompt_length"], backbone.config.self_layers
        n_mod, n_layers = len(self.modalities), len(self.layers)
        self.shared = nn.Parameter(torch.randn(n_layers, length, width) * 0.02)
        self.private = nn.Parameter(torch.randn(n_mod, n_layers, length, width) * 0.02)
        self.residual = nn.Parameter(torch.zeros(memory_layers, length, width))
        self.evaluators: nn.ModuleList | None = None
        if options["evaluator"]:
            self.evaluators = nn.ModuleList(
                nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))
                for _ in self.modalities
            )
        self.critic_output: nn.Linear | None = None
        self.critic_source: nn.Linear | None = None
        if options["weighting"] == "mi":
            self.critic_output = nn.Linear(width, width, bias=False)
            self.critic_source = nn.Linear(width, width, bias=False)
        self.current: ProMMABatch | None = None

    # --- MME -----------------------------------------------------------------------------------

    def evaluator_logits(self, pooled: Tensor, presence: Tensor) -> Tensor | None:
        """(B, M) logits of e_m from the mean pooled inputs of the present other modalities."""
        if self.evaluators is None:
            return None
        present = (presence > 0.5).to(pooled.dtype)  # (B, M)
        logits = []
        for i, evaluator in enumerate(self.evaluators):
            others = present.clone()
            others[:, i] = 0.0
            mean = (others[:, :, None] * pooled).sum(dim=1) / others.sum(1, keepdim=True).clamp(
                min=1.0
            )
            logits.append(evaluator(mean)[:, 0])
        return torch.stack(logits, dim=1)

    @staticmethod
    def private_scales(presence: Tensor, logits: Tensor | None) -> Tensor:
        """(B, M) c_m: 1 where m is present; the evaluator's detached e_m where it is missing."""
        present = (presence > 0.5).to(presence.dtype)
        if logits is None:
            return torch.ones_like(present)
        return present + (1.0 - present) * torch.sigmoid(logits.detach())

    # --- DPW -----------------------------------------------------------------------------------

    def critic_scores(self, outputs: Tensor, sources: Tensor) -> Tensor:
        """(B, B) critic scores of every (cross-modal output i, source j) pair, (B, d) each."""
        assert self.critic_output is not None and self.critic_source is not None
        u, v = self.critic_output(outputs), self.critic_source(sources)
        return u @ v.T / math.sqrt(self.width)

    def dynamic_weights(self, target: str) -> Tensor:
        """(B, M-1) omega of the sources of ``target`` (layout order), detached."""
        batch = self.current
        assert batch is not None
        if target not in batch.memory_weights:
            sources = [i for i, s in enumerate(self.modalities) if s != target]
            if self.critic_output is None:
                weights = batch.pooled.new_ones(len(batch.pooled), len(sources))
            else:
                with torch.no_grad():
                    scores = []
                    for i in sources:
                        u = batch.cross_outputs[(target, self.modalities[i])].mean(dim=1)
                        scores.append(self.critic_scores(u, batch.pooled[:, i]).diagonal())
                    weights = len(sources) * torch.stack(scores, dim=1).softmax(dim=1)
            batch.memory_weights[target] = weights
        return batch.memory_weights[target]

    # --- auxiliary losses ----------------------------------------------------------------------

    def orthogonality(self) -> Tensor:
        """The MiPD penalty, averaged over the prompted layers."""
        per_layer = [
            orthogonality_penalty([self.shared[j], *self.private[:, j]])
            for j in range(len(self.layers))
        ]
        return torch.stack(per_layer).mean()

    def critic_loss(self, presence: Tensor) -> Tensor | None:
        """InfoNCE of the critic over every (target, source) with two or more samples where the
        source is present; None when there is none."""
        batch = self.current
        if self.critic_output is None or batch is None:
            return None
        terms = []
        for (_, source), output in batch.cross_outputs.items():
            index = self.modalities.index(source)
            rows = presence[:, index] > 0.5
            if int(rows.sum()) < 2:
                continue
            scores = self.critic_scores(
                output[rows].mean(dim=1).detach(), batch.pooled[rows, index]
            )
            labels = torch.arange(len(scores), device=scores.device)
            terms.append(F.cross_entropy(scores, labels))
        return torch.stack(terms).mean() if terms else None

    # --- the hook ------------------------------------------------------------------------------

    def prompt_for(self, site: PromptSite, ctx: PromptContext) -> Tensor | None:
        if self.current is None:
            return None
        batch = ctx.batch_size
        if site.is_cross:
            if site.layer not in self.layers:
                return None
            j = self.layers.index(site.layer)
            s = self.modalities.index(site.source)  # type: ignore[arg-type]
            private = self.current.scales[:, s, None, None] * self.private[s, j]
            return torch.cat([self.shared[j].expand(batch, -1, -1), private], dim=1)
        if site.layer >= len(self.residual):
            return None
        level = self.shared.mean(dim=0) + self.residual[site.layer]  # (L, d)
        weights = self.dynamic_weights(site.target)  # (B, M-1)
        slices = [weights[:, i, None, None] * level for i in range(weights.shape[1])]
        return torch.cat(slices, dim=2)  # (B, L, (M-1) d): one slice per source


class ProMMAModel(PromptedModel):
    """Evaluates, prompts and runs the frozen backbone; while training, ``aux_loss`` holds the
    weighted orthogonality, evaluator and critic terms for the plugin to add."""

    def __init__(
        self,
        backbone: MulT,
        prompts: ProMMAPrompts,
        trainable_head: str,
        loss_weights: dict[str, float],
    ) -> None:
        super().__init__(backbone, prompts, trainable_head)
        self.loss_weights = loss_weights
        self.last_terms: dict[str, Tensor] = {}

    def pooled_inputs(self, x: Tensor) -> Tensor:
        """(B, M, d): every modality's projected tokens, mean over time (zero when missing)."""
        features, _ = self.backbone.layout.unpack(x)
        with torch.no_grad():
            return torch.stack(
                [
                    self.backbone.projections[m](features[m].transpose(1, 2)).mean(dim=2)
                    for m in self.backbone.layout.modalities
                ],
                dim=1,
            )

    def evaluator_loss(self, x: Tensor, logits: Tensor, presence: Tensor) -> Tensor | None:
        """BCE of the evaluators against the frozen model's pseudo-label targets, over the
        samples where the modality is present with at least one other; None if there is none."""
        layout = self.backbone.layout
        features, _ = layout.unpack(x)
        present = presence > 0.5
        eligible = present & (present.sum(dim=1, keepdim=True) >= 2)
        if not bool(eligible.any()):
            return None
        full = frozen_output(self.backbone, x)
        regression = self.backbone.config.output_dim == 1
        terms = []
        for i in range(len(layout.modalities)):
            rows = eligible[:, i]
            if not bool(rows.any()):
                continue
            dropped_presence = presence[rows].clone()
            dropped_presence[:, i] = 0.0
            dropped = layout.pack({m: f[rows] for m, f in features.items()}, dropped_presence)
            target = evaluator_targets(
                full[rows], frozen_output(self.backbone, dropped), regression
            )
            terms.append(F.binary_cross_entropy_with_logits(logits[rows, i], target))
        return torch.stack(terms).mean()

    def prepare(self, x: Tensor) -> Tensor:
        prompts: ProMMAPrompts = self.prompts  # type: ignore[assignment]
        _, presence = self.backbone.layout.unpack(x)
        pooled = self.pooled_inputs(x)
        logits = prompts.evaluator_logits(pooled, presence)
        scales = prompts.private_scales(presence, logits)
        prompts.current = ProMMABatch(scales, pooled, logits, presence)
        return x

    def run(self, x: Tensor) -> Tensor:
        batch: ProMMABatch = self.prompts.current  # type: ignore[assignment]
        # The recording fills cross_outputs before any memory site is asked for its prompt.
        with self.backbone.recording() as recording:
            batch.cross_outputs = recording.cross_outputs
            output = self.backbone(x)
        # Before the auxiliary loss: its frozen passes must not overwrite the outputs.
        batch.cross_outputs = dict(recording.cross_outputs)
        if self.training:
            self.aux_loss = self.auxiliary_loss(x, batch.logits, batch.presence)
        else:
            self.aux_loss = None
        return output

    def auxiliary_loss(self, x: Tensor, logits: Tensor | None, presence: Tensor) -> Tensor | None:
        prompts: ProMMAPrompts = self.prompts  # type: ignore[assignment]
        terms: dict[str, Tensor | None] = {
            "ortho_weight": prompts.orthogonality(),
            "evaluator_weight": None
            if logits is None
            else self.evaluator_loss(x, logits, presence),
            "mi_weight": prompts.critic_loss(presence),
        }
        total = None
        self.last_terms = {}
        for name, value in terms.items():
            if value is None or self.loss_weights[name] == 0:
                continue
            self.last_terms[name] = value.detach()
            weighted = self.loss_weights[name] * value
            total = weighted if total is None else total + weighted
        return total


@STRATEGIES.register(
    "promma",
    "ProMMA (rebuilt from its abstract): evaluated private prompts, MI-weighted memory prompts",
)
class ProMMA(PromptStrategy):
    family = "promma"
    OPTIONS = {
        "prompt_length": Option(16, int, "tokens of every prompt", minimum=1),
        "layers": layers_option("0,1,2", "cross-modal layers given shared and private prompts"),
        "ortho_weight": Option(0.1, float, "weight of the MiPD orthogonality penalty", minimum=0),
        "evaluator": Option(True, bool, "MME: scale a missing modality's prompt by e_m"),
        "evaluator_weight": Option(1.0, float, "weight of the evaluator's BCE", minimum=0),
        "weighting": Option("mi", str, "DPW weights of the memory prompts", choices=WEIGHTINGS),
        "mi_weight": Option(0.1, float, "weight of the MI critic's InfoNCE", minimum=0),
        "trainable_head": TRAINABLE_HEAD,
    }

    def make_model(self, backbone: MulT, ctx: StrategyContext) -> PromptedModel:
        prompts = ProMMAPrompts(backbone, self.settings())
        weights = {k: self.opt(k) for k in ("ortho_weight", "evaluator_weight", "mi_weight")}
        return ProMMAModel(backbone, prompts, self.opt("trainable_head"), weights)

    def make_plugins(self, model: Any) -> list[Any]:
        # The model weighs its terms itself (loss_weights); the plugin adds their sum.
        return [aux_loss_plugin(model)]
