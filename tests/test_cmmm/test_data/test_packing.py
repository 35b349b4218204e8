"""The packed sample layout: one flat tensor per sample, presence flags at the end."""

from __future__ import annotations

import pytest
import torch

from cmmm.data.packing import PackedLayout
from cmmm.errors import DataError

LAYOUT = PackedLayout(
    modalities=("audio", "video", "text"), seq_lens=(4, 3, 5), feature_dims=(2, 6, 3)
)


def features(batch: int = 5, seed: int = 0, layout: PackedLayout = LAYOUT) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        m: torch.randn(batch, n, d, generator=generator) + 1.0
        for m, n, d in zip(layout.modalities, layout.seq_lens, layout.feature_dims, strict=True)
    }


def test_sizes() -> None:
    assert LAYOUT.block_sizes == (8, 18, 15)
    assert LAYOUT.size == 8 + 18 + 15 + 3


def test_round_trip_all_present() -> None:
    feats = features()
    presence = torch.ones(5, 3)
    packed = LAYOUT.pack(feats, presence)
    assert packed.shape == (5, LAYOUT.size)
    assert packed.dtype == torch.float32
    unpacked, flags = LAYOUT.unpack(packed)
    assert set(unpacked) == set(LAYOUT.modalities)
    for m in LAYOUT.modalities:
        assert unpacked[m].shape == feats[m].shape
        assert torch.equal(unpacked[m], feats[m])
    assert torch.equal(flags, presence)


def test_blocks_are_row_major_in_modality_order() -> None:
    feats = features(batch=2)
    packed = LAYOUT.pack(feats, torch.ones(2, 3))
    assert torch.equal(packed[:, :8], feats["audio"].reshape(2, -1))
    assert torch.equal(packed[:, 8:26], feats["video"].reshape(2, -1))
    assert torch.equal(packed[:, 26:41], feats["text"].reshape(2, -1))
    # Row-major: the first D values are time step 0.
    assert torch.equal(packed[0, 8:14], feats["video"][0, 0])


def test_missing_blocks_are_zero_even_if_input_was_not() -> None:
    feats = features(batch=4)
    assert all((f != 0).all() for f in feats.values())
    presence = torch.tensor([[1, 1, 1], [0, 1, 1], [1, 0, 0], [0, 0, 1]], dtype=torch.float32)
    packed = LAYOUT.pack(feats, presence)
    unpacked, flags = LAYOUT.unpack(packed)
    assert torch.equal(flags, presence)
    for i, m in enumerate(LAYOUT.modalities):
        for b in range(4):
            if presence[b, i] == 1:
                assert torch.equal(unpacked[m][b], feats[m][b])
            else:
                assert torch.count_nonzero(unpacked[m][b]) == 0


def test_presence_flags_are_the_last_m_entries() -> None:
    presence = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    packed = LAYOUT.pack(features(batch=2), presence)
    assert torch.equal(packed[:, -3:], presence)


def test_bool_presence_is_accepted() -> None:
    presence = torch.tensor([[True, False, True]])
    packed = LAYOUT.pack(features(batch=1), presence)
    assert torch.equal(packed[:, -3:], torch.tensor([[1.0, 0.0, 1.0]]))
    assert torch.count_nonzero(LAYOUT.unpack(packed)[0]["video"]) == 0


def test_single_modality_layout() -> None:
    layout = PackedLayout(modalities=("text",), seq_lens=(1,), feature_dims=(7,))
    feats = features(batch=3, layout=layout)
    packed = layout.pack(feats, torch.ones(3, 1))
    assert packed.shape == (3, 8)
    assert torch.equal(layout.unpack(packed)[0]["text"], feats["text"])


def test_pack_rejects_wrong_per_sample_shape() -> None:
    feats = features(batch=2)
    feats["video"] = torch.randn(2, 3, 5)  # D should be 6
    with pytest.raises(DataError, match="video"):
        LAYOUT.pack(feats, torch.ones(2, 3))


@pytest.mark.parametrize("shape", [(2, LAYOUT.size - 1), (2, LAYOUT.size + 1), (LAYOUT.size,)])
def test_unpack_rejects_wrong_size(shape: tuple[int, ...]) -> None:
    with pytest.raises(DataError, match=str(LAYOUT.size)):
        LAYOUT.unpack(torch.zeros(shape))


def test_describe_names_every_block() -> None:
    assert LAYOUT.describe() == "audio 4x2 | video 3x6 | text 5x3 | presence 3"
