"""MPLMM (Guo, Jin and Zhao, ACL 2024: multimodal prompt learning with missing modalities) on the
frozen MulT, trained task after task like every other baseline (it has no continual mechanism).

Its three kinds of prompts, as in the public code (``zrguo/MPLMM``, ``src/model.py``):

* Generative prompts, one per modality m: when m is missing, [G_m ; f_(s->m)(x_s) for every
  available s] (concatenated along the sequence; f an MLP map, Conv1d kernel 1 + GELU) goes
  through an MLP over the sequence dimension (Conv1d over positions + GELU, one per target and
  set of available modalities) to give m's missing sequence.
* Missing-signal prompts, one "missing" S-_m and one "present" S+_m per modality (a full
  sequence each): added to m's generated (missing) or real (present) sequence.
* Missing-type prompts, one per memory (self-attention) transformer: T_t (P x d) times a (d x W)
  matrix of the sample's missing case, sum_m (S+/-_m)^T N_m (N_m learnable, L_m x W, W the memory
  width), so seven missing cases get seven prompts from shared parameters; attached in the memory
  stage.

Defaults and their sources (``zrguo/MPLMM``): prompt length 16 (``--prompt_length``); every
prompt and N_m initialised uniform [0, 1) (``torch.rand``), ``init`` "normal" gives N(0, 0.02)
instead; ``trainable_head`` "out": MPLMM trains ``out_layer`` with the prompts (it re-initialises
it because its backbone comes from another dataset; here the pre-trained layer is kept and
trained). MPLMM also trains the input projections for the same reason; here they stay frozen
with the rest of the backbone. Its gradient clipping and learning-rate schedule are not
reproduced: every method uses the runner's training protocol.

Adaptations to MulT and to the prompt hook (the backbone is not modified):

* The hook cannot replace the projected sequences the backbone computes inside ``forward``. So
  generation and the missing-signal prompts work in each modality's raw feature space, by wrapping:
  ``MPLMMModel.prepare`` unpacks the packed input (``cmmm.data.packing``), writes the generated raw
  (L_m, D_m) sequence into a missing modality's zero-filled block, adds S+/-_m ((L_m, D_m) each) to
  every modality's block and packs the result with the original presence mask: the input the
  backbone runs on. The frozen projection W_m then maps them, so the backbone sees W_m x_m + W_m S_m
  as MPLMM's proj(x_m) + S_m. When D_m >= d (W_m onto) this is an exact reparametrisation of MPLMM's
  projected-space prompts; otherwise they are limited to the range of W_m, as the projected features
  themselves are. The generator's width is D_m of the generated modality (MPLMM's: d): f_(s->m) maps
  D_s -> D_m and G_m is P x D_m.
* The missing-type matrix uses W_m S+/-_m (the projected missing-signal prompts, (L_m, d)),
  exactly MPLMM's product on the projected prompts.
* MPLMM appends the missing-type prompt as tokens to the memory transformer's input (and reads
  the last time step, which is then a prompt token's output). The hook gives prefix key/value
  tokens instead (memory sites, ``source`` None): the same T_t-derived prompt at each layer of
  ``type_layers`` ("all" memory layers by default, as appended tokens take part in every layer),
  passed through that layer's own frozen pre-attention LayerNorm, as a token of the sequence
  would be; the last time step stays a real one.
* The missing case is read from the presence mask of the input (MPLMM's ``missing_mod`` codes
  0-6 are the seven patterns), so a batch may mix cases.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmmm.backbone import MulT, PromptSite
from cmmm.data.patterns import all_patterns
from cmmm.errors import ConfigError
from cmmm.options import Option, parse_layers
from cmmm.prompt_kit import TRAINABLE_HEAD, PromptStrategy, SitePrompts
from cmmm.prompted_model import PromptedModel
from cmmm.strategy import STRATEGIES, StrategyContext

INITS = ("uniform", "normal")


class MPLMMPrompts(SitePrompts):
    def __init__(self, backbone: MulT, length: int, type_layers: tuple[int, ...], init: str):
        super().__init__()
        layout = backbone.layout
        self.modalities = layout.modalities
        self.seq_len = dict(zip(self.modalities, layout.seq_lens, strict=True))
        self.dim = dict(zip(self.modalities, layout.feature_dims, strict=True))
        self.length = length
        self.type_layers = type_layers
        d, width = backbone.config.d_model, backbone.memory_width

        def param(*shape: int) -> nn.Parameter:
            if init == "uniform":
                return nn.Parameter(torch.rand(*shape))
            return nn.Parameter(torch.randn(*shape) * 0.02)

        mods = self.modalities
        self.generative = nn.ParameterDict({m: param(length, self.dim[m]) for m in mods})
        self.cross_map = nn.ModuleDict(
            {
                f"{s}_to_{m}": nn.Conv1d(self.dim[s], self.dim[m], kernel_size=1)
                for m in mods
                for s in mods
                if s != m
            }
        )
        self.sequence_map = nn.ModuleDict(
            {
                self.sequence_key(m, subset): nn.Conv1d(
                    length + sum(self.seq_len[s] for s in subset), self.seq_len[m], kernel_size=1
                )
                for m in mods
                for subset in self.subsets(m)
            }
        )
        self.signal_missing = nn.ParameterDict({m: param(*self.block(m)) for m in mods})
        self.signal_present = nn.ParameterDict({m: param(*self.block(m)) for m in mods})
        self.missing_type = nn.ParameterDict({m: param(length, d) for m in mods})
        self.type_map = nn.ParameterDict({m: param(self.seq_len[m], width) for m in mods})
        self.patterns = all_patterns(len(mods))
        # presence bits (modality i = bit i) -> index into self.patterns; -1: every one missing.
        lookup = torch.full((2 ** len(mods),), -1, dtype=torch.long)
        for i, p in enumerate(self.patterns):
            lookup[sum(1 << b for b, present in enumerate(p) if present)] = i
        self.register_buffer("_lookup", lookup, persistent=False)

    def block(self, m: str) -> tuple[int, int]:
        """(L_m, D_m): the shape of modality m's sequence."""
        return self.seq_len[m], self.dim[m]

    def subsets(self, target: str) -> list[tuple[str, ...]]:
        """Every non-empty set of the other modalities, in layout order."""
        others = [m for m in self.modalities if m != target]
        return [s for n in range(1, len(others) + 1) for s in itertools.combinations(others, n)]

    @staticmethod
    def sequence_key(target: str, subset: tuple[str, ...]) -> str:
        return f"{target}_from_{'_'.join(subset)}"

    def pattern_indices(self, presence: Tensor) -> Tensor:
        bits = (presence > 0.5).long()
        powers = 2 ** torch.arange(bits.shape[1], device=bits.device)
        index = self._lookup.to(bits.device)[(bits * powers).sum(dim=1)]
        # Checked on the device: no host synchronisation inside a training step.
        torch._assert_async((index >= 0).all(), "mplmm: a sample has every modality missing")
        return index

    # --- generation and missing-signal prompts (raw feature space) -----------------------------

    def generate(self, target: str, subset: tuple[str, ...], sources: dict[str, Tensor]) -> Tensor:
        """(B, L_t, D_t): [G_t ; f_(s->t)(x_s) ...] mapped over the sequence dimension."""
        batch = next(iter(sources.values())).shape[0]
        parts = [self.generative[target].unsqueeze(0).expand(batch, -1, -1)]
        for s in subset:
            mapped = F.gelu(self.cross_map[f"{s}_to_{target}"](sources[s].transpose(1, 2)))
            parts.append(mapped.transpose(1, 2))  # (B, L_s, D_t)
        sequence = torch.cat(parts, dim=1)  # (B, P + sum L_s, D_t): positions as channels
        return F.gelu(self.sequence_map[self.sequence_key(target, subset)](sequence))

    def complete(self, features: dict[str, Tensor], presence: Tensor) -> dict[str, Tensor]:
        """Every modality's (B, L_m, D_m) block: generated + S-_m where missing, x + S+_m where
        present."""
        present = presence > 0.5
        completed = {}
        for i, m in enumerate(self.modalities):
            result = features[m] + self.signal_present[m]
            missing = ~present[:, i]
            if bool(missing.any()):
                for subset in self.subsets(m):
                    rows = missing.clone()
                    for j, s in enumerate(self.modalities):
                        if s != m:
                            rows &= present[:, j] if s in subset else ~present[:, j]
                    index = rows.nonzero().squeeze(1)
                    if len(index) == 0:
                        continue
                    generated = self.generate(m, subset, {s: features[s][index] for s in subset})
                    result = result.index_copy(0, index, generated + self.signal_missing[m])
            completed[m] = result
        return completed

    # --- missing-type prompts (memory stage) ---------------------------------------------------

    def case_matrices(self, projections: nn.ModuleDict) -> Tensor:
        """(K, d, W): per pattern, sum_m (W_m S_m)^T N_m with S_m = S-_m if m is missing else
        S+_m, W_m the frozen projection."""
        projected = {}
        for m in self.modalities:
            for state in ("missing", "present"):
                signal = self.signal_missing if state == "missing" else self.signal_present
                # Conv1d over (1, D_m, L_m) -> (1, d, L_m): the backbone's own projection.
                projected[m, state] = projections[m](signal[m].T.unsqueeze(0))[0]
        matrices = []
        for pattern in self.patterns:
            terms = [
                projected[m, "present" if on else "missing"] @ self.type_map[m]
                for m, on in zip(self.modalities, pattern, strict=True)
            ]
            matrices.append(torch.stack(terms).sum(dim=0))
        return torch.stack(matrices)

    def type_prompts(self, presence: Tensor, projections: nn.ModuleDict) -> dict[str, Tensor]:
        """target -> (B, P, W): T_t times the matrix of each sample's missing case."""
        cases = self.case_matrices(projections)[self.pattern_indices(presence)]  # (B, d, W)
        return {t: torch.matmul(self.missing_type[t], cases) for t in self.modalities}

    def site_key(self, site: PromptSite) -> tuple[str, int] | None:
        # A memory site (target, layer) gets its target's missing-type prompt (B, P, W).
        return None if site.is_cross else (site.target, site.layer)


class MPLMMModel(PromptedModel):
    """Completes the input (generation + missing-signal prompts), then runs the frozen backbone
    with the missing-type prompts on its memory transformers."""

    def complete_input(self, x: Tensor) -> Tensor:
        """The packed input with generated missing blocks and missing-signal prompts added; the
        presence mask is kept as it was."""
        prompts: MPLMMPrompts = self.prompts  # type: ignore[assignment]
        layout = self.backbone.layout
        features, presence = layout.unpack(x)
        completed = prompts.complete(features, presence)
        blocks = [completed[m].reshape(x.shape[0], -1) for m in layout.modalities]
        return torch.cat([*blocks, presence], dim=1)

    def prepare(self, x: Tensor) -> Tensor:
        prompts: MPLMMPrompts = self.prompts  # type: ignore[assignment]
        backbone = self.backbone
        _, presence = backbone.layout.unpack(x)
        completed = self.complete_input(x)
        raw = prompts.type_prompts(presence, backbone.projections)
        prompts.current = {
            (t, layer): backbone.site_norm(
                PromptSite(t, None, layer, backbone.memory_width), raw[t]
            )
            for t in backbone.layout.modalities
            for layer in prompts.type_layers
        }
        return completed


@STRATEGIES.register(
    "mplmm", "MPLMM: generative, missing-signal and missing-type prompts on the frozen MulT"
)
class MPLMM(PromptStrategy):
    family = "mplmm"
    OPTIONS = {
        "prompt_length": Option(
            16, int, "length of generative and missing-type prompts", minimum=1
        ),
        "type_layers": Option("all", str, "memory layers given the missing-type prompt"),
        "init": Option("uniform", str, "prompt initialisation", choices=INITS),
        "trainable_head": TRAINABLE_HEAD,
    }
    # type_layers are memory layers (or "all"), parsed here, not cross-modal ones.
    LAYER_OPTIONS = ()

    def check(self) -> None:
        raw = str(self.opt("type_layers")).strip()
        self.type_layers: tuple[int, ...] | None = None
        if raw.lower() == "all":
            self._values["type_layers"] = "all"
        else:
            self.type_layers = parse_layers("mplmm", "type_layers", raw)
            self._values["type_layers"] = ",".join(map(str, self.type_layers))

    def make_model(self, backbone: MulT, ctx: StrategyContext) -> PromptedModel:
        available = backbone.config.self_layers
        layers = tuple(range(available)) if self.type_layers is None else self.type_layers
        if not layers:
            raise ConfigError("mplmm: the backbone has no memory layer for missing-type prompts")
        if max(layers) >= available:
            raise ConfigError(
                f"mplmm: type_layers={','.join(map(str, layers))} but the memory transformers "
                f"have layers 0..{available - 1}"
            )
        prompts = MPLMMPrompts(backbone, self.opt("prompt_length"), layers, self.opt("init"))
        return MPLMMModel(backbone, prompts, self.opt("trainable_head"))
