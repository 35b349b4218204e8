"""The embedded synthetic streams: no download, seeded, small enough for a 2-minute run.

Every sample has a latent vector u ~ N(0, I_k). The label is a function of u alone (regression:
a clipped linear read-out in [-3, 3], like MOSI sentiment; classification: the arg-max of a fixed
linear map of u, 4 classes like IEMOCAP). Each modality is a sequence of its own length and
width: x_m[l] = s_m * g_m(l) * (u A_m) + noise, with a fixed random projection A_m, a fixed
positive temporal profile g_m and a signal strength s_m. Text and audio carry more signal than
video (s = 0.7, 0.5, 0.2 by default), so the missing-text tasks are the hard ones, as on the real
datasets. The data is synthetic: results on it say nothing about real sentiment or emotion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cmmm.data.dataset import MultimodalDataset, Split


@dataclass(frozen=True)
class SyntheticSpec:
    task_type: str = "regression"  # or "classification"
    num_classes: int = 4
    n_train: int = 480
    n_valid: int = 96
    n_test: int = 240
    latent_dim: int = 4
    modalities: tuple[str, ...] = ("audio", "video", "text")
    seq_lens: tuple[int, ...] = (4, 3, 5)
    feature_dims: tuple[int, ...] = (12, 16, 20)
    signal: tuple[float, ...] = (0.5, 0.2, 0.7)
    noise: float = 1.5
    seed: int = 0


def _orthonormal_projection(rng: np.random.Generator, latent_dim: int, width: int) -> np.ndarray:
    """A (latent_dim, width) map with orthonormal rows or columns, scaled to unit mean energy."""
    basis = np.linalg.qr(rng.normal(size=(max(latent_dim, width), min(latent_dim, width))))[0]
    projection = basis.T if width >= latent_dim else basis
    return projection * np.sqrt(width / latent_dim)


def make_synthetic(spec: SyntheticSpec) -> MultimodalDataset:
    m = len(spec.modalities)
    if not (len(spec.seq_lens) == len(spec.feature_dims) == len(spec.signal) == m):
        raise ValueError("seq_lens, feature_dims and signal need one entry per modality")
    # The data-generating process (projections, profiles, read-out) is fixed by the seed, and each
    # split draws its own samples from it with a derived generator.
    process = np.random.default_rng([spec.seed, 0])
    # Orthonormal projections spread every latent direction evenly over a modality's features,
    # so a modality's signal strength is s_m whatever the seed (a plain Gaussian projection can
    # by chance hide the label direction in one modality).
    projections = [_orthonormal_projection(process, spec.latent_dim, d) for d in spec.feature_dims]
    profiles = [0.5 + process.random(n) for n in spec.seq_lens]
    readout = process.normal(size=(spec.latent_dim, max(spec.num_classes, 1)))
    readout /= np.linalg.norm(readout, axis=0, keepdims=True)

    def draw(n: int, stream_id: int) -> Split:
        rng = np.random.default_rng([spec.seed, stream_id])
        u = rng.normal(size=(n, spec.latent_dim))
        features = {}
        for i, name in enumerate(spec.modalities):
            clean = (u @ projections[i])[:, None, :] * profiles[i][None, :, None]
            noise = rng.normal(scale=spec.noise, size=(n, spec.seq_lens[i], spec.feature_dims[i]))
            features[name] = (spec.signal[i] * clean + noise).astype(np.float32)
        if spec.task_type == "classification":
            labels = np.argmax(u @ readout, axis=1).astype(np.int64)
        else:
            labels = np.clip(1.5 * (u @ readout[:, 0]), -3.0, 3.0).astype(np.float32)
        return Split(features=features, labels=labels)

    is_cls = spec.task_type == "classification"
    return MultimodalDataset(
        name="synthetic-cls" if is_cls else "synthetic",
        modalities=spec.modalities,
        task_type="classification" if is_cls else "regression",
        metric_family="classification" if is_cls else "mosi",
        train=draw(spec.n_train, 1),
        valid=draw(spec.n_valid, 2),
        test=draw(spec.n_test, 3),
        num_classes=spec.num_classes if is_cls else 1,
        class_names=tuple(f"class{k}" for k in range(spec.num_classes)) if is_cls else (),
        source=f"synthetic (seeded generator, seed {spec.seed}); not real data",
        notes={"spec": spec.__dict__},
    ).validate()
