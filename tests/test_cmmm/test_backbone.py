from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cmmm.backbone import (
    MulT,
    MulTConfig,
    PromptContext,
    PromptSite,
    _future_mask,
)
from cmmm.data.packing import PackedLayout
from cmmm.errors import ConfigError, DataError

TINY = MulTConfig(d_model=4, num_heads=2, layers=2, self_layers=1)


def make_layout(shapes: dict[str, tuple[int, int]]) -> PackedLayout:
    return PackedLayout(
        modalities=tuple(shapes),
        seq_lens=tuple(n for n, _ in shapes.values()),
        feature_dims=tuple(d for _, d in shapes.values()),
    )


def make_batch(
    layout: PackedLayout, batch: int, seed: int = 0, presence: torch.Tensor | None = None
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    features = {
        m: torch.randn(batch, n, d, generator=generator)
        for m, n, d in zip(layout.modalities, layout.seq_lens, layout.feature_dims, strict=True)
    }
    if presence is None:
        presence = torch.ones(batch, len(layout.modalities))
    return layout.pack(features, presence)


def make_model(layout: PackedLayout, config: MulTConfig = TINY, seed: int = 0) -> MulT:
    torch.manual_seed(seed)
    return MulT(layout, config).eval()


AVT_L1 = make_layout({"audio": (1, 5), "video": (1, 3), "text": (1, 8)})
AVT_MIXED = make_layout({"audio": (7, 5), "video": (4, 3), "text": (6, 8)})


@pytest.mark.parametrize(
    "shapes",
    [
        {"audio": (1, 5), "video": (1, 3), "text": (1, 8)},
        {"audio": (7, 5), "video": (4, 3), "text": (6, 8)},
        {"audio": (3, 2), "video": (5, 3), "text": (2, 4), "depth": (4, 6)},
        {"audio": (3, 2), "text": (5, 7)},
    ],
)
def test_output_and_feature_shapes(shapes: dict[str, tuple[int, int]]) -> None:
    layout = make_layout(shapes)
    model = make_model(layout)
    x = make_batch(layout, batch=3)
    num_modalities = len(shapes)
    features = model.forward_features(x)
    assert features.shape == (3, num_modalities * (num_modalities - 1) * TINY.d_model)
    assert model.feature_dim == features.shape[1]
    out = model(x)
    assert out.shape == (3,)
    assert torch.isfinite(out).all()
    assert torch.equal(model.head(features).squeeze(1), out)
    sequences = model.forward_sequences(x)
    for m, n in zip(layout.modalities, layout.seq_lens, strict=True):
        assert sequences[m].shape == (3, n, (num_modalities - 1) * TINY.d_model)


def test_regression_output_works_with_l1_loss_on_flat_targets() -> None:
    model = make_model(AVT_L1)
    x = make_batch(AVT_L1, batch=4)
    loss = nn.L1Loss()(model(x), torch.zeros(4))
    assert loss.dim() == 0


def test_classification_output_shape() -> None:
    config = MulTConfig(d_model=4, num_heads=2, layers=1, self_layers=1, output_dim=4)
    model = make_model(AVT_MIXED, config)
    assert model(make_batch(AVT_MIXED, batch=5)).shape == (5, 4)


def test_branches_are_named_after_modalities() -> None:
    model = make_model(AVT_L1)
    assert set(model.projections.keys()) == {"audio", "video", "text"}
    assert model.cross_pairs == (
        ("audio", "video"),
        ("audio", "text"),
        ("video", "audio"),
        ("video", "text"),
        ("text", "audio"),
        ("text", "video"),
    )
    assert model.cross_stack.count == 6
    assert model.memory_stack.count == 3
    assert not any(name.startswith("prompt_hook") for name, _ in model.named_modules())


def test_hook_returning_none_is_bit_identical_to_no_hook() -> None:
    model = make_model(AVT_MIXED)
    x = make_batch(AVT_MIXED, batch=3)
    plain = model(x)
    with model.using_prompt_hook(lambda site, context: None):
        hooked = model(x)
    assert torch.equal(plain, hooked)


def test_prompt_on_one_site_changes_output() -> None:
    model = make_model(AVT_MIXED)
    x = make_batch(AVT_MIXED, batch=3)
    chosen = PromptSite("text", "audio", 1, width=TINY.d_model)
    prompt = torch.randn(3, TINY.d_model, generator=torch.Generator().manual_seed(1))

    def hook(site: PromptSite, context: PromptContext) -> torch.Tensor | None:
        return prompt if site == chosen else None

    plain = model(x)
    with model.using_prompt_hook(hook):
        prompted = model(x)
    assert model.prompt_hook is None
    assert not torch.allclose(plain, prompted)
    # Prompts feed only the text branch: the audio and video memory outputs are untouched.
    plain_sequences = model.forward_sequences(x)
    with model.using_prompt_hook(hook):
        prompted_sequences = model.forward_sequences(x)
    assert torch.equal(plain_sequences["audio"], prompted_sequences["audio"])
    assert torch.equal(plain_sequences["video"], prompted_sequences["video"])
    assert not torch.allclose(plain_sequences["text"], prompted_sequences["text"])


@pytest.mark.parametrize("num_modalities", [2, 3, 4])
def test_hook_is_asked_about_every_site_once(num_modalities: int) -> None:
    names = ["audio", "video", "text", "depth"][:num_modalities]
    layout = make_layout({m: (2, 3) for m in names})
    config = MulTConfig(d_model=4, num_heads=2, layers=3, self_layers=2)
    model = make_model(layout, config)
    asked: list[PromptSite] = []

    def hook(site: PromptSite, context: PromptContext) -> None:
        asked.append(site)
        assert context.batch_size == 2
        assert context.modalities == tuple(names)
        assert context.presence.shape == (2, num_modalities)

    model.prompt_hook = hook
    model(make_batch(layout, batch=2))
    expected = num_modalities * (num_modalities - 1) * 3 + num_modalities * 2
    assert len(asked) == expected
    assert len(set(asked)) == expected
    assert sorted(asked, key=lambda s: s.name) == sorted(model.prompt_sites(), key=lambda s: s.name)
    for site in model.prompt_sites():
        assert site.width == (4 if site.is_cross else (num_modalities - 1) * 4)
        assert "." not in site.name


def test_prompt_sites_order_and_names() -> None:
    model = make_model(AVT_L1)
    sites = model.prompt_sites()
    assert sites[0] == PromptSite("audio", "video", 0, width=4)
    assert sites[0].name == "audio_from_video_0"
    assert sites[4] == PromptSite("audio", None, 0, width=8)
    assert sites[4].name == "audio_self_0"
    assert len({s.name for s in sites}) == len(sites)


def test_prompts_get_gradient_and_frozen_backbone_gets_none() -> None:
    model = make_model(AVT_MIXED)
    model.train()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    prompts = nn.ParameterDict(
        {
            site.name: nn.Parameter(0.02 * torch.randn(3, site.width))
            for site in model.prompt_sites()
        }
    )
    model.prompt_hook = lambda site, context: prompts[site.name]
    model(make_batch(AVT_MIXED, batch=4)).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    for name, prompt in prompts.items():
        assert prompt.grad is not None, name
        assert prompt.grad.abs().sum() > 0, name


def test_context_carries_the_batch_presence() -> None:
    model = make_model(AVT_MIXED)
    presence = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    x = make_batch(AVT_MIXED, batch=2, presence=presence)
    seen: list[PromptContext] = []
    model.prompt_hook = lambda site, context: seen.append(context)
    model(x)
    assert len(seen) == len(model.prompt_sites())
    assert all(torch.equal(c.presence, presence) for c in seen)
    assert torch.equal(seen[0].presence_of("video"), torch.tensor([0.0, 1.0]))


def test_per_sample_prompt_affects_only_its_sample() -> None:
    model = make_model(AVT_MIXED)
    x = make_batch(AVT_MIXED, batch=2)
    base = torch.randn(2, 4)
    other = base.clone()
    other[1] += 1.0  # differ only in sample 1's prompt

    def hook_for(prompts: torch.Tensor):
        def hook(site: PromptSite, context: PromptContext) -> torch.Tensor | None:
            return prompts.unsqueeze(1).expand(-1, 3, -1) if site.is_cross else None

        return hook

    with model.using_prompt_hook(hook_for(base)):
        first = model(x)
    with model.using_prompt_hook(hook_for(other)):
        second = model(x)
    assert torch.equal(first[0], second[0])
    assert not torch.allclose(first[1], second[1])


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(3, 5),
        torch.zeros(2, 3, 4),
        torch.zeros(4),
        "not a tensor",
        torch.zeros(3, 4, dtype=torch.long),
    ],
)
def test_wrong_prompt_raises_clear_error(bad: object) -> None:
    model = make_model(AVT_MIXED)
    model.prompt_hook = lambda site, context: bad if site.name == "video_from_text_0" else None
    with pytest.raises(ConfigError, match="video_from_text_0"):
        model(make_batch(AVT_MIXED, batch=3))


def test_causal_mask_hides_later_steps_even_with_prompts() -> None:
    layout = make_layout({"audio": (6, 3), "video": (6, 2), "text": (6, 4)})
    model = make_model(layout)
    prompts = {
        site: torch.randn(2, site.width, generator=torch.Generator().manual_seed(i))
        for i, site in enumerate(model.prompt_sites())
    }
    model.prompt_hook = lambda site, context: prompts[site]
    x = make_batch(layout, batch=2)
    features, presence = layout.unpack(x)
    changed = dict(features)
    changed["audio"] = features["audio"].clone()
    changed["audio"][:, 3:] += 5.0  # change audio from step 3 on
    before = model.forward_sequences(x)
    after = model.forward_sequences(layout.pack(changed, presence))
    for m in layout.modalities:
        assert torch.allclose(before[m][:, :3], after[m][:, :3], atol=1e-6), m
        assert not torch.allclose(before[m][:, 3:], after[m][:, 3:]), m

    # Without the mask, earlier steps do see the change (so the check above is not vacuous).
    unmasked = make_model(
        layout, MulTConfig(d_model=4, num_heads=2, layers=2, self_layers=1, causal_mask=False)
    )
    unmasked.prompt_hook = model.prompt_hook
    before = unmasked.forward_sequences(x)
    after = unmasked.forward_sequences(layout.pack(changed, presence))
    assert not torch.allclose(before["text"][:, :3], after["text"][:, :3])


def test_future_mask_matches_mults_rule_and_never_masks_prefix() -> None:
    for query_len, key_len in [(4, 4), (3, 6), (6, 3), (1, 5), (5, 1)]:
        disallowed = torch.triu(torch.ones(query_len, key_len), 1 + abs(key_len - query_len))
        allowed = _future_mask(query_len, key_len, 2, torch.device("cpu"))
        if allowed is None:
            assert not disallowed.any()
            continue
        assert allowed[:, :2].all()
        assert torch.equal(allowed[:, 2:], disallowed == 0)


def test_wrong_packed_size_raises_data_error() -> None:
    model = make_model(AVT_L1)
    with pytest.raises(DataError, match="packed input"):
        model(torch.zeros(2, AVT_L1.size + 1))


def test_module_hook_is_not_registered_and_copies_drop_the_hook() -> None:
    model = make_model(AVT_L1)

    class Hook(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.prompt = nn.Parameter(torch.zeros(2, 4))

        def forward(self, site: PromptSite, context: PromptContext) -> torch.Tensor | None:
            return self.prompt if site.is_cross else None

    backbone_parameters = len(list(model.parameters()))
    model.prompt_hook = Hook()
    assert len(list(model.parameters())) == backbone_parameters
    assert "prompt_hook.prompt" not in model.state_dict()
    model(make_batch(AVT_L1, batch=2))
    assert copy.deepcopy(model).prompt_hook is None
    assert model.prompt_hook is not None


def test_invalid_configurations_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="two modalities"):
        MulT(make_layout({"audio": (1, 3)}), TINY)
    with pytest.raises(ConfigError, match="num_heads"):
        MulTConfig(d_model=30, num_heads=4)
    with pytest.raises(ConfigError, match="output_dim"):
        MulTConfig(output_dim=0)
    with pytest.raises(ConfigError, match="branch"):
        MulT(make_layout({"a.b": (1, 3), "c": (1, 2)}), TINY)


def test_default_config_matches_mult_sizes() -> None:
    model = MulT(AVT_L1)
    assert model.feature_dim == 180
    assert model.memory_width == 60
    assert len(model.cross_stack.layers) == 5
    assert len(model.memory_stack.layers) == 3
    assert model.cross_stack.layers[0].num_heads == 5
    # 6 cross-modal transformers of width 30 and 3 memory transformers of width 60, each layer
    # 12 w^2 + 13 w weights, each stack a final LayerNorm: as many weights as MulT's.
    per_layer = {w: 12 * w * w + 13 * w for w in (30, 60)}
    expected = 6 * (5 * per_layer[30] + 60) + 3 * (3 * per_layer[60] + 120)
    stacks = sum(
        p.numel() for p in [*model.cross_stack.parameters(), *model.memory_stack.parameters()]
    )
    assert stacks == expected
