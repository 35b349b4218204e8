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

Speed: the M*(M-1) cross-modal transformers all have width d and the same depth, and the M memory
transformers all have width (M-1)*d, so each family is stored as one ``_EncoderStack`` whose
weights carry a leading "member" axis. Members whose sequences have the same lengths (on
utterance-level data: all of them) run as one batched computation (``baddbmm`` and one attention
call), which removes most of the per-operation overhead of 6 x 5 + 3 x 3 small layers called one
by one. The maths is unchanged; ``tests/reference_mult.py`` keeps the one-transformer-at-a-time
implementation and the tests check that both agree. State dicts written by that layout
(``cross.<target>.<source>.layers.<i>.attention.query.weight``, ...) are converted on load.

Prompts: the backbone knows nothing about any prompt method. Before each attention layer it asks
``self.prompt_hook`` for prefix tokens for that layer's ``PromptSite``; returned tokens are
prepended to the key/value side only, so real tokens attend to them but they produce no output of
their own. This hook is the single place where prompts enter the model. A hook returns None, a
shared (P, width) prompt, per-sample (B, P, width) prompts, or an ``IndexedPrompt`` (K distinct
prompts and each sample's row): the last lets the backbone project each distinct prompt's keys and
values once per batch instead of once per sample.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmmm.data.packing import PackedLayout
from cmmm.errors import ConfigError


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


@dataclass(frozen=True)
class IndexedPrompt:
    """K distinct prompts ``tokens`` (K, P, width) and, per sample, the row it uses: ``index``
    (B,) long. Equivalent to ``tokens[index]``, but the backbone projects only the K distinct
    prompts to keys and values. Hooks should return the same ``index`` tensor object for every
    site of one forward pass, so that a whole stack of transformers shares one gather."""

    tokens: Tensor
    index: Tensor


def per_sample_prompt(prompt: Tensor | IndexedPrompt | None, batch_size: int) -> Tensor | None:
    """Any form a hook may return as the (B, P, width) tokens each sample sees (None stays
    None): for reading and testing hooks, not for the forward pass."""
    if prompt is None:
        return None
    if isinstance(prompt, IndexedPrompt):
        return prompt.tokens[prompt.index]
    return prompt.unsqueeze(0).expand(batch_size, -1, -1) if prompt.dim() == 2 else prompt


PromptHook = Callable[[PromptSite, PromptContext], "Tensor | IndexedPrompt | None"]


@dataclass
class Recording:
    """Intermediate tensors of one forward pass, for methods that read the backbone's inside
    (see ``MulT.recording``). Keys use the layout's modality names."""

    # (target, source) -> (B, L_target, d): each cross-modal transformer's output.
    cross_outputs: dict[tuple[str, str], Tensor] = field(default_factory=dict)
    # (target, source, layer) -> (B, L_source, d): the normalised source tokens that layer
    # attends to (its key/value input without any prompt).
    cross_key_values: dict[tuple[str, str, int], Tensor] = field(default_factory=dict)


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


# --------------------------------------------------------------------------------------------
# Stacked transformers: G transformers of one width and depth, weights with a leading G axis
# --------------------------------------------------------------------------------------------

# Per layer: name -> (rows, columns) of one member's matrix, in multiples of the width; a
# vector (bias or norm) has columns 0. in_proj holds query, key and value, in that order.
_LAYER_PARAMETERS: dict[str, tuple[int, int]] = {
    "in_proj_weight": (3, 1),
    "in_proj_bias": (3, 0),
    "out_proj_weight": (1, 1),
    "out_proj_bias": (1, 0),
    "attention_norm_weight": (1, 0),
    "attention_norm_bias": (1, 0),
    "ffn_norm_weight": (1, 0),
    "ffn_norm_bias": (1, 0),
    "ffn_in_weight": (4, 1),
    "ffn_in_bias": (4, 0),
    "ffn_out_weight": (1, 4),
    "ffn_out_bias": (1, 0),
}


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``F.dropout``: each element zeroed with probability p, the rest scaled by 1/(1-p).

    On the CPU the mask is drawn as uniform numbers compared in place, which measured about
    1.4x faster than ``F.dropout``'s Bernoulli draw there, and dropout is a large share of a
    training step of this small model. Elsewhere (CUDA's fused kernel) ``F.dropout`` itself.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    keep = torch.empty_like(x).uniform_().ge_(p).mul_(1.0 / (1.0 - p))
    return x * keep


def _grouped_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x (G, ..., in) @ weight (G, out, in)^T + bias (G, out) -> (G, ..., out), one baddbmm."""
    shape = x.shape
    flat = x.reshape(shape[0], -1, shape[-1])
    out = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
    return out.view(*shape[:-1], weight.shape[1])


def _grouped_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """LayerNorm over the last axis of x (G, ..., w) with per-member affine weights (G, w)."""
    normed = F.layer_norm(x, (x.shape[-1],))
    view = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    return torch.addcmul(bias.view(view), normed, weight.view(view))


@dataclass
class _StackPrefix:
    """Prefix prompts for one layer of a group of G members, ready for the attention.

    ``tokens`` (G, K, P, w) with ``index`` (B,) choosing each sample's row, or (G, B, P, w) with
    ``index`` None; ``valid`` (G, P) is False on padding (members with shorter or no prompts).
    """

    tokens: Tensor
    index: Tensor | None
    valid: Tensor | None
    # True when ``tokens`` holds K distinct rows (with ``index``) or one row for every sample,
    # rather than one row per sample.
    shared_rows: bool = False


def _stack_prefixes(
    prompts: Sequence[Tensor | IndexedPrompt | None], batch: int, width: int
) -> _StackPrefix | None:
    """One ``_StackPrefix`` from the G members' (already checked) prompts, None if all are None.

    Shared (P, w) prompts and ``IndexedPrompt``s with one common index keep their K distinct
    rows; anything else (per-sample prompts, different indices) becomes per-sample (B, P, w).
    """
    if all(p is None for p in prompts):
        return None
    lengths = [
        0 if p is None else (p.tokens if isinstance(p, IndexedPrompt) else p).shape[-2]
        for p in prompts
    ]
    longest = max(lengths)
    indices = {id(p.index): p.index for p in prompts if isinstance(p, IndexedPrompt)}
    per_sample = any(isinstance(p, Tensor) and p.dim() == 3 for p in prompts) or len(indices) > 1
    index = None if per_sample or not indices else next(iter(indices.values()))
    rows = batch if per_sample else (1 if index is None else None)
    reference = next(p for p in prompts if p is not None)
    reference_tokens = reference.tokens if isinstance(reference, IndexedPrompt) else reference
    if rows is None:
        rows = next(p.tokens.shape[0] for p in prompts if isinstance(p, IndexedPrompt))
    members = []
    for prompt, length in zip(prompts, lengths, strict=True):
        if prompt is None:
            tokens = reference_tokens.new_zeros(rows, longest, width)
        else:
            if isinstance(prompt, IndexedPrompt):
                tokens = prompt.tokens[prompt.index] if per_sample else prompt.tokens
            else:
                tokens = prompt.expand(rows, -1, -1) if prompt.dim() == 2 else prompt
            if length < longest:
                tokens = F.pad(tokens, (0, 0, 0, longest - length))
        members.append(tokens)
    valid = None
    if any(length != longest for length in lengths):
        valid = (
            torch.arange(longest, device=reference_tokens.device)[None, :]
            < torch.tensor(lengths, device=reference_tokens.device)[:, None]
        )
    return _StackPrefix(torch.stack(members), index, valid, shared_rows=not per_sample)


class _StackLayer(nn.Module):
    """One pre-LayerNorm transformer layer for G members (see ``_LAYER_PARAMETERS``)."""

    def __init__(self, count: int, width: int, config: MulTConfig) -> None:
        super().__init__()
        self.width = width
        self.num_heads = config.num_heads
        self.attn_dropout = config.attn_dropout
        self.relu_dropout = config.relu_dropout
        self.res_dropout = config.res_dropout
        self.causal_mask = config.causal_mask
        for name, (rows, columns) in _LAYER_PARAMETERS.items():
            shape = (
                (count, rows * width) if columns == 0 else (count, rows * width, columns * width)
            )
            initial = torch.ones(shape) if name.endswith("norm_weight") else torch.zeros(shape)
            self.register_parameter(name, nn.Parameter(initial))

    @torch.no_grad()
    def initialise_member(self, member: int) -> None:
        """Member ``member``'s matrices drawn exactly as the one-transformer-at-a-time MulT drew
        them (an ``nn.Linear`` each, then ``xavier_uniform_``; biases zero), consuming the
        global generator in the same order, so a seed gives the same initial weights as before
        the stacks. Norms start at weight 1, bias 0."""
        width = self.width
        blocks = self.in_proj_weight[member].split(width, dim=0)
        matrices = [*blocks, self.out_proj_weight[member]]
        matrices += [self.ffn_in_weight[member], self.ffn_out_weight[member]]
        for matrix in matrices:
            rows, columns = matrix.shape
            drawn = nn.Linear(columns, rows)
            nn.init.xavier_uniform_(drawn.weight)
            matrix.copy_(drawn.weight)

    def parameters_of(self, members: Tensor | None) -> dict[str, Tensor]:
        """Every parameter of this layer, restricted to ``members`` (all when None)."""
        return {
            name: getattr(self, name) if members is None else getattr(self, name)[members]
            for name in _LAYER_PARAMETERS
        }

    def _split_heads(self, x: Tensor) -> Tensor:
        """(G, B, L, w) -> (G, B, H, L, w/H)."""
        g, b, length, width = x.shape
        return x.view(g, b, length, self.num_heads, width // self.num_heads).transpose(2, 3)

    def _attend_one_key(self, value: Tensor, query_len: int) -> Tensor:
        """Attention over a single key: its softmax weight is exactly 1, so every query gets
        that key's value (G, B, 1, w) -> (G, B, Lq, w). The query and key products, whose
        gradient would be exactly zero, are not computed. Attention dropout still drops the
        one weight, per sample, head and query, as the full attention would."""
        g, b, _, width = value.shape
        attended = value.expand(g, b, query_len, width)
        if self.training and self.attn_dropout:
            keep = _dropout(
                value.new_ones(g, b, self.num_heads, query_len, 1), self.attn_dropout, True
            )
            heads = self._split_heads(attended) * keep
            attended = heads.transpose(2, 3).reshape(g, b, query_len, width)
        return attended

    def _attend(self, query: Tensor, key: Tensor, value: Tensor, allowed: Tensor | None) -> Tensor:
        """Multi-head attention of (G, B, Lq, w) queries over (G, B, Lk, w) keys and values;
        ``allowed`` (G, Lq, Lk) bool or None. Returns (G, B, Lq, w) before the output matrix."""
        g, b, length, width = query.shape
        dropout = self.attn_dropout if self.training else 0.0
        heads = [self._split_heads(t).flatten(0, 1) for t in (query, key, value)]
        mask = None
        if allowed is not None:
            mask = allowed[:, None, None].expand(g, b, 1, *allowed.shape[1:]).flatten(0, 1)
        attended = F.scaled_dot_product_attention(*heads, attn_mask=mask, dropout_p=dropout)
        return (
            attended.view(g, b, self.num_heads, length, -1)
            .transpose(2, 3)
            .reshape(g, b, length, width)
        )

    def forward(
        self,
        x: Tensor,
        source: Tensor | None,
        prefix: _StackPrefix | None,
        params: Mapping[str, Tensor],
        on_key_values: Callable[[Tensor], None] | None = None,
    ) -> Tensor:
        """x (G, B, Lq, w); source (G, B, Lk, w) for cross-modal layers, None for self-attention."""
        width = self.width
        norm_w, norm_b = params["attention_norm_weight"], params["attention_norm_bias"]
        in_w, in_b = params["in_proj_weight"], params["in_proj_bias"]
        query_in = _grouped_norm(x, norm_w, norm_b)
        if source is None:
            key_value_in = query_in
        else:
            key_value_in = _grouped_norm(source, norm_w, norm_b)
            if on_key_values is not None:
                on_key_values(key_value_in)
        query_len, key_len = x.shape[2], key_value_in.shape[2]
        if key_len == 1 and prefix is None:
            value = _grouped_linear(key_value_in, in_w[:, 2 * width :], in_b[:, 2 * width :])
            attended = self._attend_one_key(value, query_len)
        else:
            if source is None:
                projected = _grouped_linear(query_in, in_w, in_b)
                query, key_value = projected[..., :width], projected[..., width:]
            else:
                query = _grouped_linear(query_in, in_w[:, :width], in_b[:, :width])
                key_value = _grouped_linear(key_value_in, in_w[:, width:], in_b[:, width:])
            allowed = None
            if self.causal_mask:
                prefix_len = 0 if prefix is None else prefix.tokens.shape[-2]
                causal = _future_mask(query_len, key_len, prefix_len, x.device)
                if causal is not None:
                    allowed = causal.expand(x.shape[0], -1, -1)
            if prefix is not None and query_len == 1 and key_len == 1 and prefix.shared_rows:
                attended = self._attend_shared_prefix(query, key_value, prefix, in_w, in_b)
            else:
                if prefix is not None:
                    key_value, allowed = self._with_prefix(
                        key_value, allowed, prefix, in_w, in_b, query_len
                    )
                attended = self._attend(
                    query, key_value[..., :width], key_value[..., width:], allowed
                )
        attended = _grouped_linear(attended, params["out_proj_weight"], params["out_proj_bias"])
        x = x + _dropout(attended, self.res_dropout, self.training)

        hidden = _grouped_norm(x, params["ffn_norm_weight"], params["ffn_norm_bias"])
        hidden = F.relu(_grouped_linear(hidden, params["ffn_in_weight"], params["ffn_in_bias"]))
        hidden = _dropout(hidden, self.relu_dropout, self.training)
        hidden = _grouped_linear(hidden, params["ffn_out_weight"], params["ffn_out_bias"])
        return x + _dropout(hidden, self.res_dropout, self.training)

    def _attend_shared_prefix(
        self, query: Tensor, key_value: Tensor, prefix: _StackPrefix, in_w: Tensor, in_b: Tensor
    ) -> Tensor:
        """Attention of one query over one real key and K distinct prompts (utterance-level
        data with ``IndexedPrompt`` or shared prompts): every sample's scores against all K*P
        prompt keys come from one batched matmul, and a mask keeps each sample to its own row's
        P keys. Equal to gathering each sample's prompt and attending, without projecting or
        multiplying B copies of the K prompts one tiny matrix at a time."""
        g, b, _, width = query.shape
        heads, size = self.num_heads, width // self.num_heads
        k_rows, length = prefix.tokens.shape[1], prefix.tokens.shape[2]
        scale = 1.0 / math.sqrt(size)
        # Keys and values of the K prompts: (G, K*P, 2w) -> per head (G*H, K*P, size).
        prefix_kv = _grouped_linear(prefix.tokens, in_w[:, width:], in_b[:, width:])
        prefix_kv = prefix_kv.view(g, k_rows * length, 2, heads, size)
        prefix_keys = prefix_kv[:, :, 0].permute(0, 2, 3, 1).reshape(g * heads, size, -1)
        prefix_values = prefix_kv[:, :, 1].permute(0, 2, 1, 3).reshape(g * heads, -1, size)
        q = query.view(g, b, heads, size).transpose(1, 2).reshape(g * heads, b, size)
        # Scores against every row's keys in one matmul, then each sample keeps its own row's
        # P scores (K = 1: the one row is everyone's), so that the softmax, the mask and the
        # dropout see (B, P + 1) scores, not (B, K * P + 1).
        scores = torch.bmm(q, prefix_keys).view(g, heads, b, k_rows, length) * scale
        if prefix.index is not None:
            rows = prefix.index.view(1, 1, b, 1, 1).expand(g, heads, b, 1, length)
            scores = scores.gather(3, rows)
        scores = scores.squeeze(3)  # (G, H, B, P)
        if prefix.valid is not None:
            scores = scores.masked_fill(~prefix.valid[:, None, None, :], float("-inf"))
        real = key_value.view(g, b, 2, heads, size)
        real_scores = (q.view(g, heads, b, size) * real[:, :, 0].transpose(1, 2)).sum(-1)
        weights = torch.cat([scores, real_scores[..., None] * scale], dim=-1).softmax(dim=-1)
        weights = _dropout(weights, self.attn_dropout, self.training)
        prefix_weights = weights[..., :-1]
        if prefix.index is not None:
            # Back to all K rows (zero outside the sample's own) for one matmul with the values.
            spread = prefix_weights.new_zeros(g, heads, b, k_rows, length)
            prefix_weights = spread.scatter(3, rows, prefix_weights.unsqueeze(3))
        attended = torch.bmm(prefix_weights.reshape(g * heads, b, -1), prefix_values)
        attended = attended.view(g, heads, b, size) + (
            weights[..., -1:] * real[:, :, 1].transpose(1, 2)
        )
        return attended.transpose(1, 2).reshape(g, b, 1, width)

    def _with_prefix(
        self,
        key_value: Tensor,
        allowed: Tensor | None,
        prefix: _StackPrefix,
        in_w: Tensor,
        in_b: Tensor,
        query_len: int,
    ) -> tuple[Tensor, Tensor | None]:
        """Keys and values (G, B, P + Lk, 2w) with the prompts' in front, and the mask that
        also hides padded prompt slots."""
        width = self.width
        groups, batch, key_len = key_value.shape[:3]
        # After the norm: prompts live in the normalised key space and are not renormalised.
        # Each distinct prompt is projected once; samples then pick their rows.
        prefix_kv = _grouped_linear(prefix.tokens, in_w[:, width:], in_b[:, width:])
        if prefix.index is not None:
            prefix_kv = prefix_kv[:, prefix.index]
        elif prefix_kv.shape[1] != batch:
            prefix_kv = prefix_kv.expand(-1, batch, -1, -1)
        key_value = torch.cat([prefix_kv, key_value], dim=2)
        if prefix.valid is not None:
            real = torch.ones(groups, key_len, dtype=torch.bool, device=key_value.device)
            valid = torch.cat([prefix.valid, real], dim=1)[:, None, :].expand(-1, query_len, -1)
            allowed = valid if allowed is None else allowed & valid
        return key_value, allowed


class _EncoderStack(nn.Module):
    """G MulT transformer stacks of one width and depth: cross-modal when given a source,
    self-attention otherwise. Member g's weights are row g of every parameter."""

    def __init__(self, count: int, width: int, num_layers: int, config: MulTConfig) -> None:
        super().__init__()
        self.count = count
        self.width = width
        self.embed_scale = math.sqrt(width)
        self.embed_dropout = config.embed_dropout
        self.layers = nn.ModuleList(_StackLayer(count, width, config) for _ in range(num_layers))
        self.final_norm_weight = nn.Parameter(torch.ones(count, width))
        self.final_norm_bias = nn.Parameter(torch.zeros(count, width))
        self._positions: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    def _embed(self, x: Tensor) -> Tensor:
        key = (x.shape[2], x.device, x.dtype)
        positions = self._positions.get(key)
        if positions is None:
            # A constant of the shape: made once (the sinusoids are a dozen small ops), and
            # never as an inference tensor, which a later training pass could not use.
            with torch.inference_mode(False):
                positions = _sinusoidal_positions(x.shape[2], self.width, x.device, x.dtype)
            self._positions[key] = positions
        return _dropout(self.embed_scale * x + positions, self.embed_dropout, self.training)

    def forward(
        self,
        x: Tensor,
        source: Tensor | None = None,
        prefixes: Sequence[_StackPrefix | None] | None = None,
        members: Tensor | None = None,
        on_key_values: Callable[[int, Tensor], None] | None = None,
    ) -> Tensor:
        """x (G', B, Lq, w) for the members ``members`` (all G when None), in that order."""
        h = self._embed(x)
        embedded_source = None if source is None else self._embed(source)
        for index, layer in enumerate(self.layers):
            prefix = None if prefixes is None else prefixes[index]
            callback = None if on_key_values is None else functools.partial(on_key_values, index)
            h = layer(h, embedded_source, prefix, layer.parameters_of(members), callback)
        weight, bias = self.final_norm_weight, self.final_norm_bias
        if members is not None:
            weight, bias = weight[members], bias[members]
        return _grouped_norm(h, weight, bias)

    def norm_of(self, member: int, layer: int, tokens: Tensor) -> Tensor:
        """``tokens`` (..., w) through member ``member``'s attention LayerNorm at ``layer``."""
        stacked = self.layers[layer]
        return F.layer_norm(
            tokens,
            (self.width,),
            stacked.attention_norm_weight[member],
            stacked.attention_norm_bias[member],
        )


# --------------------------------------------------------------------------------------------
# State dicts of the one-transformer-at-a-time layout (before the stacks)
# --------------------------------------------------------------------------------------------

# Per-transformer key suffix -> (stacked name, row block of in_proj). A layer's query, key and
# value matrices became the three row blocks of its in_proj.
_LEGACY_LAYER_KEYS: dict[str, tuple[str, int | None]] = {
    "attention.query.weight": ("in_proj_weight", 0),
    "attention.query.bias": ("in_proj_bias", 0),
    "attention.key.weight": ("in_proj_weight", 1),
    "attention.key.bias": ("in_proj_bias", 1),
    "attention.value.weight": ("in_proj_weight", 2),
    "attention.value.bias": ("in_proj_bias", 2),
    "attention.out.weight": ("out_proj_weight", None),
    "attention.out.bias": ("out_proj_bias", None),
    "attention_norm.weight": ("attention_norm_weight", None),
    "attention_norm.bias": ("attention_norm_bias", None),
    "ffn_norm.weight": ("ffn_norm_weight", None),
    "ffn_norm.bias": ("ffn_norm_bias", None),
    "ffn_in.weight": ("ffn_in_weight", None),
    "ffn_in.bias": ("ffn_in_bias", None),
    "ffn_out.weight": ("ffn_out_weight", None),
    "ffn_out.bias": ("ffn_out_bias", None),
}


def legacy_key_map(
    modalities: Sequence[str], layers: int, self_layers: int
) -> dict[str, tuple[str, int, int | None]]:
    """Old per-transformer parameter name -> (stacked name, member, in_proj block or None),
    relative to the MulT module."""
    mapping: dict[str, tuple[str, int, int | None]] = {}
    pairs = [(t, s) for t in modalities for s in modalities if s != t]
    branches = [(f"cross.{t}.{s}", "cross_stack", g, layers) for g, (t, s) in enumerate(pairs)]
    branches += [(f"memory.{t}", "memory_stack", g, self_layers) for g, t in enumerate(modalities)]
    for old, new, member, depth in branches:
        for i in range(depth):
            for suffix, (name, block) in _LEGACY_LAYER_KEYS.items():
                mapping[f"{old}.layers.{i}.{suffix}"] = (f"{new}.layers.{i}.{name}", member, block)
        mapping[f"{old}.final_norm.weight"] = (f"{new}.final_norm_weight", member, None)
        mapping[f"{old}.final_norm.bias"] = (f"{new}.final_norm_bias", member, None)
    return mapping


def convert_legacy_state(
    state: dict[str, Any], prefix: str, reference: Mapping[str, Tensor], mapping: Mapping[str, Any]
) -> None:
    """Rewrite, in place, the old per-transformer keys under ``prefix`` of ``state`` into the
    stacked layout; ``reference`` gives the stacked tensors' shapes (this model's state)."""
    stacked: dict[str, Tensor] = {}
    for old, (new, member, block) in mapping.items():
        full_old = prefix + old
        if full_old not in state:
            continue
        value = state.pop(full_old)
        if new not in stacked:
            stacked[new] = torch.zeros_like(reference[new], dtype=value.dtype)
        target = stacked[new][member]
        if block is not None:
            target = target.split(target.shape[0] // 3, dim=0)[block]
        target.copy_(value)
    for new, value in stacked.items():
        state[prefix + new] = value


# --------------------------------------------------------------------------------------------
# MulT
# --------------------------------------------------------------------------------------------


class MulT(nn.Module):
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
        # Member g of the cross stack is pair g in this order: targets in layout order, each
        # with its sources in layout order (the memory transformer's concatenation order).
        self.cross_pairs: tuple[tuple[str, str], ...] = tuple(
            (t, s) for t in modalities for s in modalities if s != t
        )
        self.cross_stack = _EncoderStack(len(self.cross_pairs), d, config.layers, config)
        self.memory_stack = _EncoderStack(
            num_modalities, self.memory_width, config.self_layers, config
        )
        # In the order the one-transformer-at-a-time MulT built its transformers: each cross
        # pair's layers, then each memory transformer's (see _StackLayer.initialise_member).
        for stack in (self.cross_stack, self.memory_stack):
            for member in range(stack.count):
                for layer in stack.layers:
                    layer.initialise_member(member)
        self.proj1 = nn.Linear(self.feature_dim, self.feature_dim)
        self.proj2 = nn.Linear(self.feature_dim, self.feature_dim)
        self.out_layer = nn.Linear(self.feature_dim, config.output_dim)

        self._cross_sites = {
            (target, source): [PromptSite(target, source, i, d) for i in range(config.layers)]
            for target, source in self.cross_pairs
        }
        self._memory_sites = {
            target: [
                PromptSite(target, None, i, self.memory_width) for i in range(config.self_layers)
            ]
            for target in modalities
        }
        lengths = dict(zip(modalities, layout.seq_lens, strict=True))
        # Members that can run together: same (query, key) lengths for the cross stack, same
        # length for the memory stack. A group holding every member needs no weight gather.
        self._cross_groups = self._groups([(lengths[t], lengths[s]) for t, s in self.cross_pairs])
        self._memory_groups = self._groups([lengths[t] for t in modalities])
        self._legacy_keys = legacy_key_map(modalities, config.layers, config.self_layers)
        self._register_load_state_dict_pre_hook(self._convert_legacy_keys)
        self.prompt_hook: PromptHook | None = None
        self._recording: Recording | None = None

    @staticmethod
    def _groups(signatures: Sequence[Any]) -> list[tuple[list[int], Tensor | None]]:
        by_signature: dict[Any, list[int]] = {}
        for member, signature in enumerate(signatures):
            by_signature.setdefault(signature, []).append(member)
        if len(by_signature) == 1:
            return [(list(range(len(signatures))), None)]
        return [(members, torch.tensor(members)) for members in by_signature.values()]

    def _convert_legacy_keys(self, state: dict[str, Any], prefix: str, *args: Any) -> None:
        if any(prefix + key in state for key in self._legacy_keys):
            convert_legacy_state(state, prefix, self.state_dict(), self._legacy_keys)

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
        state["_recording"] = None
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

    @contextmanager
    def recording(self) -> Iterator[Recording]:
        """Within the block, every forward pass fills the yielded ``Recording`` (the last pass
        wins); cross outputs are recorded before any memory-transformer site is asked."""
        previous = self._recording
        self._recording = Recording()
        try:
            yield self._recording
        finally:
            self._recording = previous

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

    def site_norm(self, site: PromptSite, tokens: Tensor) -> Tensor:
        """``tokens`` (..., site.width) through the attention LayerNorm of ``site``'s layer (the
        normalisation the layer applies to its real keys and values)."""
        if site.source is None:
            member = self.layout.modalities.index(site.target)
            return self.memory_stack.norm_of(member, site.layer, tokens)
        member = self.cross_pairs.index((site.target, site.source))
        return self.cross_stack.norm_of(member, site.layer, tokens)

    @staticmethod
    def _checked_prompt(
        site: PromptSite, prompt: Tensor | IndexedPrompt | None, context: PromptContext
    ) -> Tensor | IndexedPrompt | None:
        if prompt is None:
            return None
        expected = f"(P, {site.width}), ({context.batch_size}, P, {site.width}) or an IndexedPrompt"
        tokens = prompt.tokens if isinstance(prompt, IndexedPrompt) else prompt
        if not isinstance(tokens, Tensor):
            raise ConfigError(
                f"prompt hook returned {type(prompt).__name__} for site {site.name}; "
                f"expected None or a tensor of shape {expected}"
            )
        shape = tuple(tokens.shape)
        if isinstance(prompt, IndexedPrompt):
            index = prompt.index
            if not (
                tokens.dim() == 3
                and shape[2] == site.width
                and isinstance(index, Tensor)
                and tuple(index.shape) == (context.batch_size,)
                and index.dtype == torch.long
            ):
                raise ConfigError(
                    f"indexed prompt for site {site.name} has tokens {shape} and index "
                    f"{getattr(index, 'shape', None)}; expected (K, P, {site.width}) and "
                    f"({context.batch_size},) long"
                )
        elif not (
            (tokens.dim() == 2 and shape[1] == site.width)
            or (tokens.dim() == 3 and shape[0] == context.batch_size and shape[2] == site.width)
        ):
            raise ConfigError(f"prompt for site {site.name} has shape {shape}; expected {expected}")
        if tokens.device != context.device or not tokens.is_floating_point():
            raise ConfigError(
                f"prompt for site {site.name} is a {tokens.dtype} tensor on {tokens.device}; "
                f"expected a floating tensor on {context.device}"
            )
        return prompt

    def _prefixes(
        self,
        sites_per_member: Sequence[Sequence[PromptSite]],
        depth: int,
        width: int,
        context: PromptContext | None,
    ) -> list[_StackPrefix | None] | None:
        """Per layer, the stacked prefixes of the members whose sites are given."""
        hook = self.prompt_hook
        if hook is None or context is None:
            return None
        asked = [
            [self._checked_prompt(site, hook(site, context), context) for site in sites]
            for sites in sites_per_member
        ]
        prefixes = [
            _stack_prefixes([member[layer] for member in asked], context.batch_size, width)
            for layer in range(depth)
        ]
        return None if all(p is None for p in prefixes) else prefixes

    # --- forward -------------------------------------------------------------------------------

    def forward_sequences(self, x: Tensor) -> dict[str, Tensor]:
        """Memory-transformer outputs per target modality, (B, L_m, (M-1)*d) each."""
        return self._forward(x, keep_sequences=True)  # type: ignore[return-value]

    def _forward(self, x: Tensor, keep_sequences: bool) -> dict[str, Tensor] | Tensor:
        modalities = self.layout.modalities
        features, presence = self.layout.unpack(x)
        context = None
        if self.prompt_hook is not None:
            context = PromptContext(presence, modalities, x.shape[0], x.device)
        recording = self._recording
        config = self.config

        projected = {
            # A kernel-1 Conv1d is a matrix product over the feature axis.
            m: F.linear(features[m], self.projections[m].weight[..., 0])
            for m in modalities
        }

        crossed: dict[tuple[str, str], Tensor] = {}
        whole: Tensor | None = None  # (G, B, L, d) when one group holds every pair
        for members, index in self._cross_groups:
            pairs = [self.cross_pairs[g] for g in members]
            on_key_values = None
            if recording is not None:
                on_key_values = _key_value_recorder(recording, pairs)
            prefixes = self._prefixes(
                [self._cross_sites[pair] for pair in pairs], config.layers, config.d_model, context
            )
            out = self.cross_stack(
                torch.stack([projected[t] for t, _ in pairs]),
                torch.stack([projected[s] for _, s in pairs]),
                prefixes,
                index,
                on_key_values,
            )
            if index is None:
                whole = out
            for pair, output in zip(pairs, out.unbind(0), strict=True):
                crossed[pair] = output
        if recording is not None:
            recording.cross_outputs.update(crossed)

        m = len(modalities)
        memory_inputs: dict[str, Tensor] = {}
        if whole is not None and len(self._memory_groups) == 1:
            # Every pair in one tensor (targets major): regroup along features without copies
            # of each pair, (M*(M-1), B, L, d) -> (M, B, L, (M-1)*d).
            g, b, length, d = whole.shape
            stacked_inputs = whole.view(m, m - 1, b, length, d).permute(0, 2, 3, 1, 4)
            stacked_inputs = stacked_inputs.reshape(m, b, length, (m - 1) * d)
        else:
            stacked_inputs = None
            for target in modalities:
                memory_inputs[target] = torch.cat(
                    [crossed[(target, s)] for s in modalities if s != target], dim=2
                )

        sequences: dict[str, Tensor] = {}
        for members, index in self._memory_groups:
            targets = [modalities[g] for g in members]
            inputs = (
                stacked_inputs
                if stacked_inputs is not None
                else torch.stack([memory_inputs[t] for t in targets])
            )
            prefixes = self._prefixes(
                [self._memory_sites[t] for t in targets],
                config.self_layers,
                self.memory_width,
                context,
            )
            out = self.memory_stack(inputs, None, prefixes, index)
            if not keep_sequences and index is None:
                # (M, B, W) last steps -> (B, M*W), targets in layout order.
                return out[:, :, -1].transpose(0, 1).reshape(x.shape[0], -1)
            for target, sequence in zip(targets, out.unbind(0), strict=True):
                sequences[target] = sequence
        if keep_sequences:
            return sequences
        return torch.cat([sequences[t][:, -1] for t in modalities], dim=1)

    def forward_features(self, x: Tensor) -> Tensor:
        """The concatenated last time steps of every memory transformer, (B, M*(M-1)*d)."""
        return self._forward(x, keep_sequences=False)  # type: ignore[return-value]

    def head_hidden(self, features: Tensor) -> Tensor:
        """The residual MLP of the head on ``forward_features`` output, before ``out_layer``:
        (B, M*(M-1)*d). Prompt methods with their own output layers start from here."""
        hidden = _dropout(F.relu(self.proj1(features)), self.config.out_dropout, self.training)
        return self.proj2(hidden) + features

    def head(self, features: Tensor) -> Tensor:
        """Residual MLP head on ``forward_features`` output; (B, output_dim), never squeezed."""
        return self.out_layer(self.head_hidden(features))

    def squeeze_output(self, output: Tensor) -> Tensor:
        """(B,) for a one-output head (regression), else unchanged."""
        return output.squeeze(1) if self.config.output_dim == 1 else output

    def forward(self, x: Tensor) -> Tensor:
        return self.squeeze_output(self.head(self.forward_features(x)))


def _key_value_recorder(
    recording: Recording, pairs: Sequence[tuple[str, str]]
) -> Callable[[int, Tensor], None]:
    def record(layer: int, key_values: Tensor) -> None:
        for (target, source), tokens in zip(pairs, key_values.unbind(0), strict=True):
            recording.cross_key_values[(target, source, layer)] = tokens

    return record
