"""The stacked MulT against the one-transformer-at-a-time reference (tests/reference_mult.py).

Both are built from the same seed; the reference's state dict (the old per-transformer keys) is
loaded into the stacked model, which converts it, so every test also checks the conversion.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from reference_mult import ReferenceMulT

from cmmm.backbone import (
    IndexedPrompt,
    MulT,
    MulTConfig,
    PromptContext,
    PromptSite,
    per_sample_prompt,
)
from cmmm.data.packing import PackedLayout
from cmmm.optimizers import adam

NAMES = ("audio", "video", "text", "depth")
NO_DROPOUT = dict(attn_dropout=0.0, relu_dropout=0.0, res_dropout=0.0, embed_dropout=0.0)


def layout_of(num_modalities: int, length: int) -> PackedLayout:
    """Every modality of ``length`` steps; feature widths differ per modality."""
    return PackedLayout(
        NAMES[:num_modalities], (length,) * num_modalities, (5, 3, 8, 4)[:num_modalities]
    )


def mixed_layout() -> PackedLayout:
    return PackedLayout(("audio", "video", "text"), (7, 1, 4), (5, 3, 8))


def pair(layout: PackedLayout, config: MulTConfig, seed: int = 0) -> tuple[ReferenceMulT, MulT]:
    torch.manual_seed(seed)
    reference = ReferenceMulT(layout, config)
    torch.manual_seed(seed)
    stacked = MulT(layout, config)
    stacked.load_state_dict(reference.state_dict())
    return reference, stacked


def batch(layout: PackedLayout, size: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    features = {
        m: torch.randn(size, n, d, generator=generator)
        for m, n, d in zip(layout.modalities, layout.seq_lens, layout.feature_dims, strict=True)
    }
    presence = (torch.rand(size, len(layout.modalities), generator=generator) > 0.3).float()
    presence[:, 0] = 1.0
    return layout.pack(features, presence)


def random_prompts(model: MulT, seed: int = 2) -> dict[PromptSite, torch.Tensor]:
    """Prompts of different lengths per site, so stacked members need padding."""
    generator = torch.Generator().manual_seed(seed)
    return {
        site: torch.randn(4, 1 + (index % 3), site.width, generator=generator)
        for index, site in enumerate(model.prompt_sites())
    }


def indexed_hook(prompts: dict[PromptSite, torch.Tensor], index: torch.Tensor):
    """Every form a hook may return, by layer: indexed, shared, per-sample, none."""

    def hook(site: PromptSite, ctx: PromptContext):
        kind = site.layer % 4
        if kind == 0:
            return IndexedPrompt(prompts[site], index)
        if kind == 1:
            return prompts[site][0]
        if kind == 2:
            return prompts[site][index]
        return None

    return hook


def reference_hook(hook, batch_size: int):
    return lambda site, ctx: per_sample_prompt(hook(site, ctx), batch_size)


@pytest.mark.parametrize("num_modalities", [2, 3, 4])
@pytest.mark.parametrize("length", [1, 50])
@pytest.mark.parametrize("prompted", [False, True])
def test_stacked_forward_equals_the_reference(num_modalities, length, prompted) -> None:
    layout = layout_of(num_modalities, length)
    config = MulTConfig(d_model=6, num_heads=2, layers=4, self_layers=2)
    reference, stacked = pair(layout, config)
    reference.eval(), stacked.eval()
    x = batch(layout, 5)
    if prompted:
        index = torch.tensor([0, 3, 1, 3, 2])
        hook = indexed_hook(random_prompts(stacked), index)
        with stacked.using_prompt_hook(hook), reference.using_prompt_hook(reference_hook(hook, 5)):
            expected, actual = reference(x), stacked(x)
    else:
        expected, actual = reference(x), stacked(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_unequal_lengths_run_in_groups_and_equal_the_reference() -> None:
    layout = mixed_layout()
    config = MulTConfig(d_model=6, num_heads=3, layers=3, self_layers=2)
    reference, stacked = pair(layout, config)
    reference.eval(), stacked.eval()
    x = batch(layout, 4)
    index = torch.tensor([1, 0, 3, 1])
    hook = indexed_hook(random_prompts(stacked), index)
    with stacked.using_prompt_hook(hook), reference.using_prompt_hook(reference_hook(hook, 4)):
        torch.testing.assert_close(stacked(x), reference(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(
            stacked.forward_sequences(x)["video"],
            reference.forward_sequences(x)["video"],
            rtol=0,
            atol=1e-5,
        )


@pytest.mark.parametrize("prompted", [False, True])
def test_five_adam_steps_give_the_same_losses(prompted) -> None:
    """Training from the same weights with dropout off: the same loss at every step (naive
    fine-tuning of the whole MulT; with prompts, the prompts train as well)."""
    layout = layout_of(3, 1)
    config = MulTConfig(
        d_model=6, num_heads=2, layers=3, self_layers=2, **NO_DROPOUT, out_dropout=0.0
    )
    reference, stacked = pair(layout, config)
    x, y = batch(layout, 16), torch.randn(16)
    losses = {}
    for name, model in (("reference", reference), ("stacked", stacked)):
        model.train()
        prompts = {s: p.clone().requires_grad_(True) for s, p in random_prompts(stacked).items()}
        index = torch.arange(16) % 4
        hook = indexed_hook(prompts, index) if prompted else None
        if name == "reference" and hook is not None:
            hook = reference_hook(hook, 16)
        params = [*model.parameters(), *(prompts.values() if prompted else [])]
        optimizer = torch.optim.Adam(params, lr=1e-2)
        losses[name] = []
        for _ in range(5):
            optimizer.zero_grad()
            with model.using_prompt_hook(hook):
                loss = F.l1_loss(model(x), y)
            loss.backward()
            optimizer.step()
            losses[name].append(loss.item())
    torch.testing.assert_close(
        torch.tensor(losses["stacked"]), torch.tensor(losses["reference"]), rtol=0, atol=1e-5
    )


def test_same_seed_gives_the_reference_initial_weights() -> None:
    """Construction draws the global generator as the reference did: the same seed makes the
    same MulT, before and after the stacks."""
    layout = mixed_layout()
    torch.manual_seed(7)
    reference = ReferenceMulT(layout, MulTConfig())
    after_reference = torch.rand(3)
    torch.manual_seed(7)
    stacked = MulT(layout, MulTConfig())
    after_stacked = torch.rand(3)
    converted = MulT(layout, MulTConfig())
    converted.load_state_dict(reference.state_dict())
    for key, value in stacked.state_dict().items():
        assert torch.equal(value, converted.state_dict()[key]), key
    assert torch.equal(after_reference, after_stacked)


def test_parameter_count_is_the_references() -> None:
    layout = layout_of(3, 1)
    reference, stacked = pair(layout, MulTConfig())
    assert sum(p.numel() for p in stacked.parameters()) == sum(
        p.numel() for p in reference.parameters()
    )


def test_old_state_dict_in_a_wrapper_converts_under_its_prefix() -> None:
    """A state dict saved from a model that held the old MulT as a submodule (a strategy's
    wrapper, a pre-trained backbone cache) loads into the same wrapper around the stacked one."""
    layout = layout_of(3, 1)
    reference, stacked = pair(layout, MulTConfig())
    old = torch.nn.ModuleDict({"backbone": reference}).state_dict()
    new = torch.nn.ModuleDict({"backbone": copy.deepcopy(stacked)})
    torch.manual_seed(99)
    new["backbone"] = MulT(layout, MulTConfig())  # other weights, then overwritten
    new.load_state_dict(old)
    for key, value in stacked.state_dict().items():
        assert torch.equal(new.state_dict()[f"backbone.{key}"], value), key


def test_one_key_attention_skips_query_and_key_products() -> None:
    """At length 1 the query/key rows of in_proj get no gradient (they cannot change the output)
    while the value rows do."""
    layout = layout_of(3, 1)
    _, stacked = pair(layout, MulTConfig(d_model=6, num_heads=2, layers=2, self_layers=1))
    stacked.train()
    stacked(batch(layout, 8)).sum().backward()
    grad = stacked.cross_stack.layers[0].in_proj_weight.grad
    assert grad is not None
    assert torch.count_nonzero(grad[:, :12]) == 0
    assert torch.count_nonzero(grad[:, 12:]) > 0


def test_every_tensor_of_a_training_step_follows_the_model_device() -> None:
    """One full training step (forward, loss, backward, Adam) on the meta device: any tensor the
    step created on another device would raise. Nothing leaves the device (no .item())."""
    layout = mixed_layout()
    with torch.device("meta"):
        model = MulT(layout, MulTConfig(d_model=6, num_heads=2, layers=2, self_layers=1))
        x = torch.empty(4, layout.size)
        y = torch.empty(4)
    index = torch.zeros(4, dtype=torch.long, device="meta")
    prompts = {
        site: torch.empty(2, 3, site.width, device="meta", requires_grad=True)
        for site in model.prompt_sites()
    }
    optimizer = adam([*model.parameters(), *prompts.values()], 1e-3)
    with model.using_prompt_hook(indexed_hook(prompts, index)):
        loss = F.l1_loss(model(x), y)
    loss.backward()
    optimizer.step()
    assert loss.device.type == "meta"
    assert all(p.grad is None or p.grad.device.type == "meta" for p in model.parameters())


def test_recording_gives_each_cross_output_and_key_values() -> None:
    layout = layout_of(3, 2)
    _, stacked = pair(layout, MulTConfig(d_model=6, num_heads=2, layers=2, self_layers=1))
    stacked.eval()
    x = batch(layout, 3)
    with stacked.recording() as recording:
        stacked(x)
    pairs = [(t, s) for t, s in itertools.permutations(layout.modalities, 2)]
    assert set(recording.cross_outputs) == set(pairs)
    assert set(recording.cross_key_values) == {(t, s, i) for t, s in pairs for i in range(2)}
    assert recording.cross_outputs[("text", "audio")].shape == (3, 2, 6)
    # The key/values are the source's tokens under that layer's norm: the same source gives
    # the same tokens for every target up to the (here identical at init) norm weights.
    torch.testing.assert_close(
        recording.cross_key_values[("video", "audio", 0)],
        recording.cross_key_values[("text", "audio", 0)],
    )


def test_training_state_of_the_old_layout_resumes_with_the_same_adam_moments() -> None:
    """A checkpoint's trainable names and Adam state written with the per-transformer MulT are
    converted: one more step from it equals one more step of the reference."""
    from cmmm.legacy_state import convert_training_state
    from cmmm.template_state import _optimizer_state, _restore_optimizer_state

    layout = layout_of(3, 2)
    config = MulTConfig(
        d_model=6, num_heads=2, layers=2, self_layers=1, **NO_DROPOUT, out_dropout=0.0
    )
    reference, stacked = pair(layout, config)
    x, y = batch(layout, 8), torch.randn(8)

    class Template:
        def __init__(self, model: torch.nn.Module) -> None:
            self.model = model
            self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    old = Template(reference.train())
    for _ in range(3):
        old.optimizer.zero_grad()
        F.l1_loss(reference(x), y).backward()
        old.optimizer.step()
    saved = {
        "model": copy.deepcopy(reference.state_dict()),
        "trainable": [n for n, p in reference.named_parameters() if p.requires_grad],
        "optimizer": copy.deepcopy(_optimizer_state(old)),
    }
    new = Template(stacked.train())
    assert convert_training_state(stacked, saved)
    stacked.load_state_dict(saved["model"])
    _restore_optimizer_state(new, saved["optimizer"])
    assert set(saved["trainable"]) == {n for n, _ in stacked.named_parameters()}
    for template, model in ((old, reference), (new, stacked)):
        template.optimizer.zero_grad()
        F.l1_loss(model(x), y).backward()
        template.optimizer.step()
    torch.testing.assert_close(stacked(x), reference(x), rtol=0, atol=1e-5)
