"""Pre-training the backbone on the full-modality train split, cached per stream and seed.

method.md [R]: without CMU-MOSEI, the backbone is pre-trained on its own stream's train split
with every modality present; the best validation epoch is kept. The checkpoint is cached under a
key that covers everything it depends on (the data's bytes, the backbone configuration, the
pre-training settings and the seed), so every strategy of the same stream and seed starts from
the same weights and only the first run pays for it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cmmm.atomic_files import atomic_write
from cmmm.backbone import MulT, MulTConfig
from cmmm.data.dataset import MultimodalDataset
from cmmm.data.missing_stream import MissingModalityStream
from cmmm.errors import ConfigError
from cmmm.plain_training import fit


def dataset_fingerprint(dataset: MultimodalDataset) -> str:
    digest = hashlib.sha256()
    for split_name, split in dataset.splits.items():
        digest.update(split_name.encode())
        for m in dataset.modalities:
            digest.update(m.encode())
            digest.update(np.ascontiguousarray(split.features[m]).tobytes())
        digest.update(np.ascontiguousarray(split.labels).tobytes())
    return digest.hexdigest()


def task_criterion(dataset: MultimodalDataset) -> nn.Module:
    """method.md: L1 for the regression datasets, cross-entropy for classification."""
    return nn.CrossEntropyLoss() if dataset.task_type == "classification" else nn.L1Loss()


def backbone_config_for(dataset: MultimodalDataset, **overrides: Any) -> MulTConfig:
    output_dim = dataset.num_classes if dataset.task_type == "classification" else 1
    known = {f.name for f in fields(MulTConfig)} - {"output_dim"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown backbone options {unknown}; valid: {sorted(known)}")
    return MulTConfig(output_dim=output_dim, **overrides)


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's weights (names, shapes, dtypes and values, in name order).

    Pre-training is deterministic on one machine but not across CPUs (their float kernels sum
    in different orders), so the same key can name different backbones on two machines: runs
    record this to pair only with runs that started from the very same weights.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        values = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(values.shape)}:{values.dtype};".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def pretrained_backbone(
    stream: MissingModalityStream,
    config: MulTConfig,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    cache_dir: Path,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> tuple[MulT, dict[str, object]]:
    """Return the pre-trained backbone (on ``device``) and a record of how it was made."""
    key_material = {
        "data": dataset_fingerprint(stream.dataset),
        "backbone": asdict(config),
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "format": 1,
    }
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"{stream.dataset.name}-seed{seed}-{key}.pt"
    torch.manual_seed(seed)
    model = MulT(stream.layout, config).to(device)
    record: dict[str, object] = {"checkpoint": str(path), "key": key, "epochs": epochs}
    if path.exists():
        try:
            saved = torch.load(path, map_location=device, weights_only=True)
            model.load_state_dict(saved["state_dict"])
            record.update(
                cached=True,
                valid_loss=saved["valid_loss"],
                weights_sha256=weights_fingerprint(model),
            )
            log(f"pre-trained backbone: reusing {path}")
            return model, record
        except Exception as error:  # a damaged cache is rebuilt, never fatal
            log(f"pre-trained backbone: cache {path} is unreadable ({error}); rebuilding")
    log(f"pre-training MulT on the full-modality train split ({epochs} epochs)")
    train_x, train_y = stream.full_train().tensors()
    valid_x, valid_y = stream.full_valid().tensors()
    valid_loss = fit(
        model,
        (train_x, train_y),
        task_criterion(stream.dataset),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        valid=(valid_x, valid_y),
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    content = {"state_dict": model.state_dict(), "valid_loss": valid_loss, **key_material}
    atomic_write(path, lambda handle: torch.save(content, handle))
    # No epochs: the backbone stays at its seeded initialisation and has no validation loss.
    loss = "none (0 epochs)" if valid_loss is None else f"{valid_loss:.4f}"
    log(f"pre-trained backbone: best valid loss {loss}, saved {path}")
    record.update(cached=False, valid_loss=valid_loss, weights_sha256=weights_fingerprint(model))
    return model, record
