"""MPLMM (Guo, Jin and Zhao, ACL 2024: multimodal prompt learning with missing modalities) on the
frozen MulT, trained task after task like every other baseline (it has no continual mechanism).

Three kinds of prompts: generative prompts make a missing modality's sequence from the present
ones (``cmmm.kit.modality_generation``), in the raw feature space the packed input carries;
missing-signal prompts S-_m / S+_m are added to m's generated or real sequence; missing-type
prompts T_t, times a matrix of the sample's missing case built from shared parameters, are prefix
tokens of the memory transformers. Defaults, their sources (``zrguo/MPLMM``) and the adaptations
to MulT and to the prompt hook: docs/strategies.md#mplmm.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from cmmm.backbone import MulT, PromptSite
from cmmm.data.patterns import all_patterns
from cmmm.errors import ConfigError
from cmmm.kit.modality_generation import ModalityGenerators
from cmmm.kit.pattern_lookup import pattern_indices, pattern_lookup
from cmmm.kit.prompt_init import normal_parameter, rand_parameter
from cmmm.kit.prompt_kit import TRAINABLE_HEAD, PromptStrategy
from cmmm.options import Option, parse_layers_or_all
from cmmm.prompted_model import PromptedModel
from cmmm.strategy import STRATEGIES, StrategyContext

INITS = ("uniform", "normal")
# "uniform": the code's torch.rand, U[0, 1); "normal": N(0, 0.02).
INITIALISERS: dict[str, Callable[..., nn.Parameter]] = {
    "uniform": rand_parameter,
    "normal": normal_parameter,
}


class MPLMMPrompts(ModalityGenerators):
    def __init__(self, backbone: MulT, length: int, type_layers: tuple[int, ...], init: str):
        param = INITIALISERS[init]
        super().__init__(backbone, length, param)
        self.type_layers = type_layers
        d, width, mods = backbone.config.d_model, backbone.memory_width, self.modalities
        self.signal_missing = nn.ParameterDict({m: param(*self.block(m)) for m in mods})
        self.signal_present = nn.ParameterDict({m: param(*self.block(m)) for m in mods})
        self.missing_type = nn.ParameterDict({m: param(length, d) for m in mods})
        self.type_map = nn.ParameterDict({m: param(self.seq_len[m], width) for m in mods})
        self.patterns = all_patterns(len(mods))
        # presence bits -> index into self.patterns; not saved (it follows from the layout).
        self.register_buffer("_lookup", pattern_lookup(self.patterns, len(mods)), persistent=False)

    def pattern_indices(self, presence: Tensor) -> Tensor:
        return pattern_indices(self._lookup, presence, "mplmm: a sample has every modality missing")

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
        signals = prompts.signal_present, prompts.signal_missing
        completed = prompts.complete(features, presence, *signals)
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
        self.type_layers = parse_layers_or_all("mplmm", "type_layers", self.opt("type_layers"))
        # Stored normalised ("all" or a sorted comma list), as the run key reads it.
        layers = self.type_layers
        self._values["type_layers"] = "all" if layers is None else ",".join(map(str, layers))

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
