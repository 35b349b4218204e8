"""MulT (Tsai et al. 2019) for any number of modalities, with one prompt hook.

Architecture, following the authors' MulT code (and MPLMM, which builds on it):

* per modality m: Conv1d(kernel 1, no bias) from its feature width to d;
* per ordered pair (target m, source m'), m != m': a cross-modal transformer in which the target
  sequence attends to the source sequence (``layers`` layers of width d);
* per target m: a "memory" self-attention transformer over the concatenation, along features,
  of its M-1 cross-modal outputs (``self_layers`` layers of width (M-1)*d);
* the last time step of every memory transformer, concatenated (M*(M-1)*d features), then a
  residual MLP head.

Every transformer scales its inputs by sqrt(width), adds sinusoidal positions and applies the
embedding dropout; every layer is pre-LayerNorm (one LayerNorm shared by query and key/value, as
in MulT), multi-head attention, residual, FFN of width 4*width, residual; the stack ends with a
LayerNorm.

Prompts: the backbone knows nothing about any prompt method. Before each attention layer it asks
``self.prompt_hook`` for prefix tokens for that layer's ``PromptSite``; returned tokens are
prepended to the key/value side only, so real tokens attend to them but they produce no output of
their own. This hook is the single place where prompts enter the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmmm.errors import ConfigError
from cmmm.packing import PackedLayout


@dataclass(frozen=True)
class MulTConfig:
    d_model: int = 30
    num_heads: int = 5
    layers: int = 5
    self_layers: int = 3
    attn_dropout: float = 0.1
    relu_dropout: float = 0.1
    res_dropout: float = 0.1
    embed_dropout: float = 0.25
    out_dropout: float = 0.1
    causal_mask: bool = True
    output_dim: int = 1

    def __post_init__(self) -> None:
        if self.d_model < 1 or self.num_heads < 1 or self.d_model % self.num_heads != 0:
            raise ConfigError(
                f"MulT: d_model ({self.d_model}) must be a positive multiple of num_heads "
                f"({self.num_heads})"
            )
        if self.layers < 0 or self.self_layers < 0:
            raise ConfigError(
                f"MulT: layers ({self.layers}) and self_layers ({self.self_layers}) must be >= 0"
            )
        if self.output_dim < 1:
            raise ConfigError(f"MulT: output_dim must be >= 1, got {self.output_dim}")
        for name in ("attn_dropout", "relu_dropout", "res_dropout", "embed_dropout", "out_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ConfigError(f"MulT: {name} must be in [0, 1), got {p}")


@dataclass(frozen=True)
class PromptSite:
    """One attention layer that can take prefix prompts.

    ``source`` is the key/value modality of a cross-modal transformer, or None for the memory
    (self-attention) transformer of ``target``. ``width`` is the token width that layer expects;
    it is derived from the other fields, so it takes no part in equality or hashing and sites can
    be used as dictionary keys.
    """

    target: str
    source: str | None
    layer: int
    width: int = field(compare=False)

    @property
    def is_cross(self) -> bool:
        return self.source is not None

    @property
    def name(self) -> str:
        """A stable identifier usable as an ``nn.ParameterDict``/``ModuleDict`` key (no dots)."""
        branch = (
            f"{self.target}_from_{self.source}"
            if self.source is not None
            else (f"{self.target}_self")
        )
        return f"{branch}_{self.layer}"


@dataclass(frozen=True)
class PromptContext:
    """What a hook may look at for the current batch."""

    presence: Tensor  # (B, M), 1.0 where the modality is present, in layout order
    modalities: tuple[str, ...]
    batch_size: int
    device: torch.device

    def presence_of(self, modality: str) -> Tensor:
        """(B,) presence flags of one modality."""
        return self.presence[:, self.modalities.index(modality)]


PromptHook = Callable[[PromptSite, PromptContext], Tensor | None]


def _sinusoidal_positions(
    length: int, width: int, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """(length, width) sinusoids for positions 1..length: sines in the first half, cosines in
    the second, a zero column when the width is odd (the fairseq layout MulT uses)."""
    half = width // 2
    rate = math.log(10000.0) / max(half - 1, 1)
    frequencies = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * -rate)
    positions = torch.arange(1, length + 1, device=device, dtype=torch.float32)
    angles = positions[:, None] * frequencies[None, :]
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if width % 2 == 1:
        table = F.pad(table, (0, 1))
    return table.to(dtype)


def _future_mask(
    query_len: int, key_len: int, prefix_len: int, device: torch.device
) -> Tensor | None:
    """Boolean (query_len, prefix_len + key_len) mask, True where attention is allowed.

    MulT's ``buffered_future_mask``: query i may see key j iff j - i <= |key_len - query_len|, so
    with unequal lengths the shorter side sees further ahead. Prefix columns are always allowed.
    Returns None when nothing is masked, which spares the attention a mask entirely.
    """
    slack = abs(key_len - query_len)
    if key_len - 1 <= slack:  # even the first query row sees every key
        return None
    offsets = (
        torch.arange(key_len, device=device)[None, :]
        - torch.arange(query_len, device=device)[:, None]
    )
    allowed = offsets <= slack
    if prefix_len:
        allowed = torch.cat(
            [torch.ones(query_len, prefix_len, dtype=torch.bool, device=device), allowed], dim=1
        )
    return allowed


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


class MulT(nn.Module):
    """MulT over a packed input (see ``cmmm.packing``), for M >= 2 modalities.

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
    def using_prompt_hook(self, hook: PromptHook | None) -> Iterator[MulT]:
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
