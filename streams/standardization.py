"""Per-feature standardisation with train-split statistics.

The real MOSI features come on very different scales (openSMILE audio columns with standard
deviations from 0 to ~50, text embeddings below 1); an unscaled modality either dominates the
model or is ignored. Statistics come from the train split only, so nothing of the test split
leaks; a zero-filled missing modality then sits at the train mean. Constant features are centred
and left unscaled.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from streams.base import MultimodalDataset, Split


def standardize(dataset: MultimodalDataset) -> MultimodalDataset:
    stats = {}
    for m in dataset.modalities:
        train = dataset.train.features[m].astype(np.float64)
        flat = train.reshape(-1, train.shape[-1])
        mean = flat.mean(axis=0)
        std = flat.std(axis=0)
        stats[m] = (mean, np.where(std > 1e-8, std, 1.0))

    def scaled(split: Split) -> Split:
        features = {
            m: ((split.features[m] - stats[m][0]) / stats[m][1]).astype(np.float32)
            for m in dataset.modalities
        }
        return dataclasses.replace(split, features=features)

    return dataclasses.replace(
        dataset,
        train=scaled(dataset.train),
        valid=scaled(dataset.valid),
        test=scaled(dataset.test),
        notes={**dataset.notes, "standardized": "per feature, train-split mean and std"},
    ).validate()
