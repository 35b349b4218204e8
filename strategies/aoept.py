"""AOEPT (Lang, Hong, Zhong and Zhou, "Breaking the Implicit Modality-Reduction Bottleneck in
Modality-Missing Prompt Tuning", ICML 2026; seed ``001_c3b23fbb85f65bb6``) on the frozen MulT,
trained task after task like every other baseline (it has no continual mechanism).

The seed is the abstract only; the mechanism follows baselines.md and the public code
(``Jian-Lang/AOEPT``, ``AOEPT_ViLT_model.py``, read only). Taken from them:

* Modal-contextualised prompts. Offline, the frozen backbone runs over training data where
  modality m is present; m's tokens are mean-pooled per sample and prompted layer and K-means
  clusters them into a frozen bank C_(m,l) of N rows. Learnable queries Q_(m,l) (L x d) attend
  over the bank (multi-head, no projections, the bank is keys and values), with a residual and a
  LayerNorm per modality: P_(m,l) = LN_m(Q + attn(Q, C, C)).
* Instance gate: g = sigmoid(W2 relu(W1 f_src)), channel-wise (d gates), one MLP per modality
  (shared by the layers), f_src the pooled tokens of the other modalities at that layer; g = 1
  when no other modality is present. The gated prompt is g (.) P_(m,l).
* Injection, as the code: the layer's prompt is sum_m w_m g_m (.) P_(m,l) with w_m = 1 for a
  missing modality, and 1/M for every modality of a complete sample (the code's 0.5 for two),
  preceded by the shared prompt (the code's default ``use_shared_prompt``): a query Q_(s,l)
  over the concatenation of every bank of layer l, its own LayerNorm, gated by the mean of the
  present modalities' pooled tokens.
* Auxiliary InfoNCE, weight 0.05: per modality and layer, on the samples where m is present
  (at least two), the length-mean of the gated prompt against the detached pooled tokens of m,
  cosine logits times exp(s), s a learnable log-temperature initialised to ln 100, cross-entropy
  to the diagonal, averaged over (m, l). Added to the loss by a plugin in ``before_backward``.
* Defaults: N = 32 clusters, L = 16, gate reduction 16 (the ViLT configurations), queries
  N(0, 0.02), prompts on the first half of the layers (6 of ViLT's 12). ``trainable_head`` "out":
  AOEPT trains its classifier with the prompts; MulT's counterpart is ``out_layer``.

Reconstructed for MulT and the continual stream (the backbone is not modified):

* MulT has no joint sequence; AOEPT's code inserts its one prompt block where every token reads
  it. Here that block is the key/value prefix of every cross-modal transformer at a prompted
  layer (layers "0,1,2" of 5); the memory transformers get none.
* "m's tokens at layer l" are the keys/values that layer receives from m in the cross-modal
  transformers whose source is m (its LayerNorm of m's embedded sequence), mean-pooled over time
  and averaged over those M-1 transformers, from a prompt-free pass of the frozen backbone
  (``cmmm.prompt_kit``). They feed the bank, the gates and the InfoNCE targets alike. The
  code's gates read the prompted previous layer's output instead; prompts are requested before a
  layer runs, so here they read the un-prompted features (as L2P reads its query).
* When the bank is built: the paper builds it once, offline, before prompt tuning. In the stream
  a modality's bank is built once, at the start of the first experience whose training data has
  that modality present (the first experience for every modality in the default order), and is
  frozen from then on (a buffer, never trained). Until it exists, P_(m,l) = LN_m(Q).
* K-means is ``cmmm.prompt_kit.kmeans`` (k-means++ seeding, Lloyd iterations, seeded by
  ``kmeans_seed``) instead of scikit-learn's; with fewer samples than N, fewer rows are kept.
* Attention heads: the code's 4 do not divide d = 30; the default is the backbone's own number of
  heads (5). With d = 30 the gate's hidden width is max(1, d // 16) = 1 unit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmmm.backbone import MulT
from cmmm.errors import ConfigError
from cmmm.options import Option
from cmmm.prompt_kit import (
    KMEANS_SEED,
    TRAINABLE_HEAD,
    PromptStrategy,
    SitePrompts,
    aux_loss_plugin_class,
    frozen_inputs,
    frozen_site_tokens,
    kmeans,
    layers_option,
    mean_pooled_modality_tokens,
    missing_or_every,
)
from cmmm.prompted_model import PromptedModel
from cmmm.strategy import STRATEGIES, StrategyContext

# (modality, layer) -> (B, d) pooled tokens of that modality at that layer.
PooledTokens = dict[tuple[str, int], Tensor]


def bank_attention(queries: Tensor, bank: Tensor, heads: int) -> Tensor:
    """(..., L, d): multi-head attention of ``queries`` (..., L, d) over ``bank`` (N, d) as keys
    and values, without projections (AOEPT's parameter-free dot-product attention)."""
    *lead, length, width = queries.shape
    q = queries.reshape(-1, length, heads, width // heads).transpose(1, 2)
    kv = bank.reshape(1, len(bank), heads, width // heads).transpose(1, 2)
    kv = kv.expand(q.shape[0], -1, -1, -1)
    out = F.scaled_dot_product_attention(q, kv, kv)
    return out.transpose(1, 2).reshape(*lead, length, width)


def info_nce(prompts: Tensor, features: Tensor, log_scale: Tensor) -> Tensor:
    """Cross-entropy of cosine logits (times exp(log_scale)) between matching rows of
    ``prompts`` and ``features`` (B, d) against every other row of the batch."""
    logits = F.normalize(prompts, dim=1) @ F.normalize(features, dim=1).T * log_scale.exp()
    return F.cross_entropy(logits, torch.arange(len(prompts), device=prompts.device))


class AOEPTPrompts(SitePrompts):
    """Banks (frozen buffers), queries, LayerNorms and gates; ``layer_prompts`` per batch (every
    cross-modal transformer of a prompted layer gets that layer's prefix)."""

    def __init__(self, backbone: MulT, heads: int, options: Mapping[str, Any]) -> None:
        super().__init__()
        self.modalities = tuple(backbone.layout.modalities)
        self.layers: tuple[int, ...] = options["layers"]
        self.heads = heads
        self.use_shared: bool = options["shared_prompt"]
        width, length = backbone.config.d_model, options["prompt_length"]
        gate_hidden = max(1, width // options["gate_reduction"])
        n_mod, n_layers = len(self.modalities), len(self.layers)
        self.queries = nn.Parameter(torch.randn(n_mod, n_layers, length, width) * 0.02)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in self.modalities)
        self.gates = nn.ModuleList(self._gate(width, gate_hidden) for _ in self.modalities)
        if self.use_shared:
            self.shared_query = nn.Parameter(torch.randn(n_layers, length, width) * 0.02)
            self.shared_norm = nn.LayerNorm(width)
            self.shared_gate = self._gate(width, gate_hidden)
        self.log_scale = nn.Parameter(torch.tensor(math.log(100.0)))
        # The banks: rows 0..bank_rows[m]-1 of bank[m, layer] are valid; 0 rows: not built yet.
        bank = torch.zeros(n_mod, n_layers, options["bank_size"], width)
        self.register_buffer("bank", bank)
        self.register_buffer("bank_rows", torch.zeros(n_mod, dtype=torch.long))

    @staticmethod
    def _gate(width: int, hidden: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width))

    # --- banks ---------------------------------------------------------------------------------

    def has_bank(self, modality: str) -> bool:
        return bool(self.bank_rows[self.modalities.index(modality)] > 0)

    def set_bank(self, modality: str, centroids: Sequence[Tensor]) -> None:
        """Store modality's bank, one (rows, d) centroid matrix per prompted layer."""
        index = self.modalities.index(modality)
        rows = {len(c) for c in centroids}
        if len(centroids) != len(self.layers) or len(rows) != 1:
            raise ConfigError(
                f"aoept: a bank needs one centroid matrix per prompted layer "
                f"({len(self.layers)}), all with the same number of rows; got "
                f"{len(centroids)} with rows {sorted(rows)}"
            )
        count = rows.pop()
        with torch.no_grad():
            self.bank[index].zero_()
            for i, c in enumerate(centroids):
                self.bank[index, i, :count] = c.to(self.bank)
        self.bank_rows[index] = count

    def valid_bank(self, index: int, layer_index: int) -> Tensor:
        return self.bank[index, layer_index, : int(self.bank_rows[index])]

    # --- prompts -------------------------------------------------------------------------------

    def modality_prompts(self) -> Tensor:
        """(M, layers, L, d): P_(m,l) = LN_m(Q + attn(Q, C, C)); LN_m(Q) before m's bank exists."""
        per_modality = []
        for i in range(len(self.modalities)):
            per_layer = []
            for j in range(len(self.layers)):
                query = self.queries[i, j]
                bank = self.valid_bank(i, j)
                attended = bank_attention(query, bank, self.heads) if len(bank) else 0.0
                per_layer.append(self.norms[i](query + attended))
            per_modality.append(torch.stack(per_layer))
        return torch.stack(per_modality)

    def shared_prompts(self) -> Tensor:
        """(layers, L, d): the shared query over every built bank of its layer."""
        per_layer = []
        for j in range(len(self.layers)):
            query = self.shared_query[j]
            banks = [self.valid_bank(i, j) for i in range(len(self.modalities))]
            joint = torch.cat(banks)
            attended = bank_attention(query, joint, self.heads) if len(joint) else 0.0
            per_layer.append(self.shared_norm(query + attended))
        return torch.stack(per_layer)

    def gate_values(self, pooled: PooledTokens, presence: Tensor) -> dict[tuple[str, int], Tensor]:
        """(modality, layer) -> (B, d) gates: sigmoid of the modality's MLP on the mean pooled
        tokens of the present other modalities; 1 for a sample with no other modality."""
        present = (presence > 0.5).to(presence.dtype)
        gates = {}
        for i, m in enumerate(self.modalities):
            others = [j for j in range(len(self.modalities)) if j != i]
            count = present[:, others].sum(dim=1, keepdim=True)  # (B, 1)
            for layer in self.layers:
                summed = sum(
                    present[:, j, None] * pooled[(self.modalities[j], layer)] for j in others
                )
                source = summed / count.clamp(min=1.0)
                gate = torch.sigmoid(self.gates[i](source))
                gates[(m, layer)] = torch.where(count > 0, gate, torch.ones_like(gate))
        return gates

    def layer_prompts(
        self, pooled: PooledTokens, presence: Tensor, with_aux: bool
    ) -> tuple[dict[int, Tensor], Tensor | None]:
        """Each prompted layer's (B, P, d) prefix, and (``with_aux``) the mean InfoNCE."""
        prompts = self.modality_prompts()  # (M, layers, L, d)
        gates = self.gate_values(pooled, presence)
        # w_m: 1 for each missing modality; 1/M for every modality of a complete sample.
        weights = missing_or_every(presence, 1.0 / presence.shape[1])  # (B, M)
        present = presence > 0.5
        shared = self.shared_prompts() if self.use_shared else None
        layer_prompts: dict[int, Tensor] = {}
        terms: list[Tensor] = []
        for j, layer in enumerate(self.layers):
            combined = 0.0
            for i, m in enumerate(self.modalities):
                gated = gates[(m, layer)][:, None, :] * prompts[i, j]  # (B, L, d)
                combined = combined + weights[:, i, None, None] * gated
                rows = present[:, i]
                if with_aux and int(rows.sum()) >= 2:
                    summary = gated[rows].mean(dim=1)
                    terms.append(info_nce(summary, pooled[(m, layer)][rows], self.log_scale))
            assert isinstance(combined, Tensor)
            if shared is not None:
                present_f = present.to(presence.dtype)
                fused = sum(
                    present_f[:, i, None] * pooled[(m, layer)]
                    for i, m in enumerate(self.modalities)
                ) / present_f.sum(dim=1, keepdim=True).clamp(min=1.0)
                gate = torch.sigmoid(self.shared_gate(fused))[:, None, :]
                combined = torch.cat([gate * shared[j], combined], dim=1)
            layer_prompts[layer] = combined
        aux = torch.stack(terms).mean() if terms else None
        return layer_prompts, aux


class AOEPTModel(PromptedModel):
    """Reads the frozen backbone's pooled tokens at the prompted layers, builds the layers'
    prompts from them and the banks, then runs the backbone with those prompts. While training,
    ``aux_loss`` holds the InfoNCE term for the plugin to add."""

    def pooled_tokens(self, x: Tensor) -> PooledTokens:
        prompts: AOEPTPrompts = self.prompts  # type: ignore[assignment]
        tokens = frozen_site_tokens(self.backbone, x, prompts.layers)
        return mean_pooled_modality_tokens(tokens, prompts.modalities, prompts.layers)

    def prepare(self, x: Tensor) -> Tensor:
        prompts: AOEPTPrompts = self.prompts  # type: ignore[assignment]
        pooled = self.pooled_tokens(x)
        _, presence = self.backbone.layout.unpack(x)
        prompts.current, aux = prompts.layer_prompts(pooled, presence, with_aux=self.training)
        self.aux_loss = aux if self.training else None
        return x

    def build_missing_banks(self, dataset: Any, seed: int) -> list[str]:
        """K-means banks for every modality that has none yet and is present somewhere in
        ``dataset`` (an experience's training set); returns the modalities given a bank."""
        prompts: AOEPTPrompts = self.prompts  # type: ignore[assignment]
        wanted = [m for m in prompts.modalities if not prompts.has_bank(m)]
        if not wanted:
            return []
        points: dict[tuple[str, int], list[Tensor]] = {
            (m, layer): [] for m in wanted for layer in prompts.layers
        }
        for x in frozen_inputs(self.backbone, dataset):
            pooled = self.pooled_tokens(x)
            _, presence = self.backbone.layout.unpack(x)
            for m in wanted:
                rows = presence[:, prompts.modalities.index(m)] > 0.5
                for layer in prompts.layers:
                    points[(m, layer)].append(pooled[(m, layer)][rows])
        built = []
        bank_size = prompts.bank.shape[2]
        for m in wanted:
            per_layer = [torch.cat(points[(m, layer)]) for layer in prompts.layers]
            if len(per_layer[0]) == 0:
                continue  # m is missing from every sample of this experience
            centroids = [kmeans(p, bank_size, seed=seed) for p in per_layer]
            rows = min(len(c) for c in centroids)
            prompts.set_bank(m, [c[:rows] for c in centroids])
            built.append(m)
        return built


def make_aoept_plugin(model: AOEPTModel, kmeans_seed: int, aux_weight: float) -> Any:
    """Builds the missing banks before each experience trains, and adds ``aux_weight`` times the
    InfoNCE term to the loss of every training minibatch."""

    class AOEPTPlugin(aux_loss_plugin_class()):  # type: ignore[misc]
        # The banks live in the prompt module's buffers (bank_rows says which exist), so a
        # checkpoint of the model carries them; ``built`` is only a record for inspection.
        def __init__(self) -> None:
            super().__init__(model, aux_weight)
            self.built: dict[int, list[str]] = {}

        def before_training_exp(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            experience = strategy.experience.current_experience
            self.built[experience] = model.build_missing_banks(
                strategy.experience.dataset, kmeans_seed
            )

    return AOEPTPlugin()


@STRATEGIES.register(
    "aoept", "AOEPT: gated prompts that attend over K-means banks of each modality's tokens"
)
class AOEPT(PromptStrategy):
    family = "aoept"
    OPTIONS = {
        "bank_size": Option(32, int, "K-means rows N of each (modality, layer) bank", minimum=1),
        "prompt_length": Option(16, int, "query and prompt length L", minimum=1),
        "layers": layers_option("0,1,2"),
        "gate_reduction": Option(16, int, "r of the gate MLP d -> d/r -> d", minimum=1),
        "heads": Option(
            None,
            int,
            "heads of the bank attention (none: the backbone's)",
            minimum=1,
            nullable=True,
        ),
        "aux_weight": Option(0.05, float, "weight of the InfoNCE term", minimum=0),
        "shared_prompt": Option(True, bool, "also a shared prompt over every bank"),
        "kmeans_seed": KMEANS_SEED,
        "trainable_head": TRAINABLE_HEAD,
    }

    def make_model(self, backbone: MulT, ctx: StrategyContext) -> PromptedModel:
        width = backbone.config.d_model
        heads = self.opt("heads") or backbone.config.num_heads
        if width % heads:
            raise ConfigError(
                f"aoept: heads={heads} does not divide the model width d={width}; set -o heads "
                f"to a divisor of {width}"
            )
        prompts = AOEPTPrompts(backbone, heads, self.settings())
        return AOEPTModel(backbone, prompts, self.opt("trainable_head"))

    def make_plugins(self, model: Any) -> list[Any]:
        return [make_aoept_plugin(model, self.opt("kmeans_seed"), self.opt("aux_weight"))]
