"""What the frozen backbone feeds its cross-modal attentions, read from its recording.

MemPrompt and AOEPT condition their prompts on "modality m's tokens at layer l". In MulT,
modality m's tokens at layer l are the key/value tokens of the cross-modal transformers whose
source is m: layer l's own LayerNorm of the embedded sequence of m, one copy per target (M-1 of
them, differing only by that LayerNorm). ``frozen_site_tokens`` runs the backbone once without
prompts (``strategies.l2p.frozen_query``: eval mode, no gradient) inside
``MulT.recording()`` and returns the key/value tokens each cross-modal layer received. Nothing of
the backbone is re-implemented or modified. A modality that is missing has its zero-filled block
here, so its tokens are the LayerNorm of the positional embedding alone: the same for every
sample.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from cmmm.backbone import MulT
from strategies.l2p import frozen_query

# (target, source, cross-modal layer) -> (B, L_source, d) key/value tokens.
SiteTokens = dict[tuple[str, str, int], Tensor]


def frozen_site_tokens(backbone: MulT, x: Tensor, layers: Sequence[int]) -> SiteTokens:
    """The key/value tokens of every cross-modal transformer at ``layers``, for the packed input
    ``x``, from one prompt-free pass of the frozen backbone."""
    with backbone.recording() as recording:
        frozen_query(backbone, x)
    wanted = set(layers)
    return {key: tokens for key, tokens in recording.cross_key_values.items() if key[2] in wanted}


def mean_pooled_modality_tokens(
    tokens: SiteTokens, modalities: Sequence[str], layers: Sequence[int]
) -> dict[tuple[str, int], Tensor]:
    """(modality, layer) -> (B, d): that modality's tokens mean-pooled over time, averaged over
    the M-1 cross-modal transformers that read them at that layer."""
    pooled: dict[tuple[str, int], Tensor] = {}
    for source in modalities:
        for layer in layers:
            copies = [tokens[(t, source, layer)].mean(dim=1) for t in modalities if t != source]
            pooled[(source, layer)] = sum(copies[1:], copies[0]) / len(copies)
    return pooled
