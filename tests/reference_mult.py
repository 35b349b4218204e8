"""The one-transformer-at-a-time MulT that ``cmmm.backbone`` replaced (its layout before the
stacked transformers), kept only as the reference the tests compare the stacked backbone to.

Same maths as ``cmmm.backbone.MulT``; its state dict uses the old per-transformer keys, which the
stacked backbone converts on load.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmmm.backbone import (
    MulTConfig,
    PromptContext,
    PromptHook,
    PromptSite,
    _future_mask,
    _sinusoidal_positions,
)
from cmmm.data.packing import PackedLayout
from cmmm.errors import ConfigError


def _xavier_linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class _MultiHeadAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = _xavier_linear(width, width)
        self.key = _xavier_linear(width, width)
        self.value = _xavier_linear(width, width)
        self.out = _xavier_linear(width, width)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, query: Tensor, key_value: Tensor, allowed: Tensor | None) -> Tensor:
        batch, length, width = query.shape
        attended = F.scaled_dot_product_attention(
            self._split_heads(self.query(query)),
            self._split_heads(self.key(key_value)),
            self._split_heads(self.value(key_value)),
            attn_mask=allowed,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(attended.transpose(1, 2).reshape(batch, length, width))


class _EncoderLayer(nn.Module):
    def __init__(self, width: int, config: MulTConfig) -> None:
        super().__init__()
        self.attention = _MultiHeadAttention(width, config.num_heads, config.attn_dropout)
        self.attention_norm = nn.LayerNorm(width)
        self.ffn_norm = nn.LayerNorm(width)
        self.ffn_in = _xavier_linear(width, 4 * width)
        self.ffn_out = _xavier_linear(4 * width, width)
        self.relu_dropout = config.relu_dropout
        self.res_dropout = config.res_dropout
        self.causal_mask = config.causal_mask

    def forward(self, x: Tensor, source: Tensor | None, prefix: Tensor | None) -> Tensor:
        query = self.attention_norm(x)
        key_value = query if source is None else self.attention_norm(source)
        real_keys = key_value.shape[1]
        if prefix is not None:
            # After the norm: prompts live in the normalised key space and are not renormalised.
            key_value = torch.cat([prefix, key_value], dim=1)
        allowed = None
        if self.causal_mask:
            prefix_len = 0 if prefix is None else prefix.shape[1]
            allowed = _future_mask(x.shape[1], real_keys, prefix_len, x.device)
        attended = self.attention(query, key_value, allowed)
        x = x + F.dropout(attended, self.res_dropout, self.training)

        hidden = F.relu(self.ffn_in(self.ffn_norm(x)))
        hidden = F.dropout(hidden, self.relu_dropout, self.training)
        return x + F.dropout(self.ffn_out(hidden), self.res_dropout, self.training)


class _Encoder(nn.Module):
    """A MulT transformer stack: cross-modal when given a source, self-attention otherwise."""

    def __init__(self, width: int, num_layers: int, config: MulTConfig) -> None:
        super().__init__()
        self.width = width
        self.embed_scale = math.sqrt(width)
        self.embed_dropout = config.embed_dropout
        self.layers = nn.ModuleList(_EncoderLayer(width, config) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(width)

    def _embed(self, x: Tensor) -> Tensor:
        positions = _sinusoidal_positions(x.shape[1], self.width, x.device, x.dtype)
        return F.dropout(self.embed_scale * x + positions, self.embed_dropout, self.training)

    def forward(
        self,
        x: Tensor,
        source: Tensor | None = None,
        prefixes: Sequence[Tensor | None] | None = None,
    ) -> Tensor:
        h = self._embed(x)
        embedded_source = None if source is None else self._embed(source)
        for index, layer in enumerate(self.layers):
            prefix = None if prefixes is None else prefixes[index]
            h = layer(h, embedded_source, prefix)
        return self.final_norm(h)


class ReferenceMulT(nn.Module):
    """MulT over a packed input (see ``cmmm.data.packing``), for M >= 2 modalities.

    ``forward(x)`` returns (B,) when ``config.output_dim == 1`` (regression) and (B, C) otherwise.
    Set ``prompt_hook`` (or use ``using_prompt_hook``) to inject prefix prompts; see
    ``prompt_sites`` for every place the hook is asked.
    """

    def __init__(self, layout: PackedLayout, config: MulTConfig | None = None) -> None:
        super().__init__()
        config = config or MulTConfig()
        modalities = layout.modalities
        if len(modalities) < 2:
            raise ConfigError(f"MulT needs at least two modalities, got {list(modalities)}")
        if len(set(modalities)) != len(modalities):
            raise ConfigError(f"MulT: modality names must be unique, got {list(modalities)}")
        reserved = set(dir(nn.ModuleDict()))
        for m in modalities:
            if not m or "." in m or m in reserved:
                raise ConfigError(
                    f"MulT: modality name {m!r} cannot name a branch (empty, has a dot, or is "
                    "an nn.Module attribute)"
                )
        self.layout = layout
        self.config = config
        d = config.d_model
        num_modalities = len(modalities)
        self.memory_width = (num_modalities - 1) * d
        self.feature_dim = num_modalities * self.memory_width

        self.projections = nn.ModuleDict(
            {
                m: nn.Conv1d(width, d, kernel_size=1, bias=False)
                for m, width in zip(modalities, layout.feature_dims, strict=True)
            }
        )
        self.cross = nn.ModuleDict(
            {
                target: nn.ModuleDict(
                    {
                        source: _Encoder(d, config.layers, config)
                        for source in modalities
                        if source != target
                    }
                )
                for target in modalities
            }
        )
        self.memory = nn.ModuleDict(
            {
                target: _Encoder(self.memory_width, config.self_layers, config)
                for target in modalities
            }
        )
        self.proj1 = nn.Linear(self.feature_dim, self.feature_dim)
        self.proj2 = nn.Linear(self.feature_dim, self.feature_dim)
        self.out_layer = nn.Linear(self.feature_dim, config.output_dim)

        self._cross_sites = {
            (target, source): [PromptSite(target, source, i, d) for i in range(config.layers)]
            for target in modalities
            for source in modalities
            if source != target
        }
        self._memory_sites = {
            target: [
                PromptSite(target, None, i, self.memory_width) for i in range(config.self_layers)
            ]
            for target in modalities
        }
        self.prompt_hook: PromptHook | None = None

    # --- the prompt hook -----------------------------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        # A hook that is itself an nn.Module would otherwise be registered as a submodule: its
        # prompts would then be frozen, saved and moved together with the backbone.
        if name == "prompt_hook":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles carry no hook: a hook is usually a bound method of a strategy, which
        # must neither be deep-copied with the model nor need to be picklable.
        state = super().__getstate__()
        state["prompt_hook"] = None
        return state

    @contextmanager
    def using_prompt_hook(self, hook: PromptHook | None) -> Iterator[ReferenceMulT]:
        """Use ``hook`` inside the ``with`` block, then restore whatever hook was set before."""
        previous = self.prompt_hook
        self.prompt_hook = hook
        try:
            yield self
        finally:
            self.prompt_hook = previous

    def prompt_sites(self) -> list[PromptSite]:
        """Every site the hook is asked about, each with its token width: per target (layout
        order), its cross-modal transformers (sources in layout order, layers 0..layers-1), then
        its memory transformer (source None, layers 0..self_layers-1)."""
        sites: list[PromptSite] = []
        for target in self.layout.modalities:
            for source in self.layout.modalities:
                if source != target:
                    sites.extend(self._cross_sites[(target, source)])
            sites.extend(self._memory_sites[target])
        return sites

    def _prefixes(
        self, hook: PromptHook, sites: list[PromptSite], context: PromptContext
    ) -> list[Tensor | None] | None:
        prefixes = [self._checked_prompt(site, hook(site, context), context) for site in sites]
        return None if all(p is None for p in prefixes) else prefixes

    @staticmethod
    def _checked_prompt(
        site: PromptSite, prompt: Tensor | None, context: PromptContext
    ) -> Tensor | None:
        if prompt is None:
            return None
        expected = f"(P, {site.width}) or ({context.batch_size}, P, {site.width})"
        if not isinstance(prompt, Tensor):
            raise ConfigError(
                f"prompt hook returned {type(prompt).__name__} for site {site.name}; "
                f"expected None or a tensor of shape {expected}"
            )
        shape = tuple(prompt.shape)
        if prompt.dim() == 2 and shape[1] == site.width:
            prompt = prompt.unsqueeze(0).expand(context.batch_size, -1, -1)
        elif not (prompt.dim() == 3 and shape[0] == context.batch_size and shape[2] == site.width):
            raise ConfigError(f"prompt for site {site.name} has shape {shape}; expected {expected}")
        if prompt.device != context.device or not prompt.is_floating_point():
            raise ConfigError(
                f"prompt for site {site.name} is a {prompt.dtype} tensor on {prompt.device}; "
                f"expected a floating tensor on {context.device}"
            )
        return prompt

    # --- forward -------------------------------------------------------------------------------

    def forward_sequences(self, x: Tensor) -> dict[str, Tensor]:
        """Memory-transformer outputs per target modality, (B, L_m, (M-1)*d) each."""
        features, presence = self.layout.unpack(x)
        hook = self.prompt_hook
        context = None
        if hook is not None:
            context = PromptContext(presence, self.layout.modalities, x.shape[0], x.device)

        projected = {
            m: self.projections[m](features[m].transpose(1, 2)).transpose(1, 2)
            for m in self.layout.modalities
        }
        sequences: dict[str, Tensor] = {}
        for target in self.layout.modalities:
            crossed = []
            for source in self.layout.modalities:
                if source == target:
                    continue
                prefixes = None
                if hook is not None and context is not None:
                    prefixes = self._prefixes(hook, self._cross_sites[(target, source)], context)
                crossed.append(
                    self.cross[target][source](projected[target], projected[source], prefixes)
                )
            prefixes = None
            if hook is not None and context is not None:
                prefixes = self._prefixes(hook, self._memory_sites[target], context)
            sequences[target] = self.memory[target](torch.cat(crossed, dim=2), None, prefixes)
        return sequences

    def forward_features(self, x: Tensor) -> Tensor:
        """The concatenated last time steps of every memory transformer, (B, M*(M-1)*d)."""
        sequences = self.forward_sequences(x)
        return torch.cat([sequences[m][:, -1] for m in self.layout.modalities], dim=1)

    def head(self, features: Tensor) -> Tensor:
        """Residual MLP head on ``forward_features`` output; (B, output_dim), never squeezed."""
        hidden = F.dropout(F.relu(self.proj1(features)), self.config.out_dropout, self.training)
        return self.out_layer(self.proj2(hidden) + features)

    def forward(self, x: Tensor) -> Tensor:
        output = self.head(self.forward_features(x))
        return output.squeeze(1) if self.config.output_dim == 1 else output
