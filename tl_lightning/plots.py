"""Plots of feature spaces: a 2-D embedding (PCA or t-SNE) coloured by class, and by domain where there is one.

The CS231n view of "code space": points that share a class should gather. For domain adaptation the same
points coloured by domain show whether source and target features mix (Ganin et al. 2016, Fig. 6).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from tl_lightning.atomic import save_figure
from tl_lightning.errors import TLError

METHODS = ("pca", "tsne")


def embed_2d(features: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """[N, D] features -> [N, 2] points by PCA or t-SNE (t-SNE after PCA to 50 dimensions, as usual)."""
    features = np.asarray(features, dtype=np.float64)
    if method not in METHODS:
        raise TLError(f"unknown embedding method '{method}'; choose one of {', '.join(METHODS)}.")
    if features.ndim != 2 or len(features) < 3:
        raise TLError(f"a 2-D embedding needs at least 3 feature vectors; got an array of shape {features.shape}.")
    from sklearn.decomposition import PCA

    if method == "pca":
        points = PCA(n_components=2, random_state=seed).fit_transform(features)
        return points if points.shape[1] == 2 else np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
    from sklearn.manifold import TSNE

    if features.shape[1] > 50 and len(features) > 50:
        features = PCA(n_components=50, random_state=seed).fit_transform(features)
    perplexity = float(min(30.0, max(2.0, (len(features) - 1) / 3)))
    return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(features)


def _labels_1d(targets: np.ndarray) -> np.ndarray:
    """Class indices; for multi-label targets the first positive label (-1 where there is none)."""
    targets = np.asarray(targets)
    if targets.ndim == 1:
        return targets.astype(np.int64)
    positive = targets > 0
    return np.where(positive.any(1), positive.argmax(1), -1)


def _scatter(ax, points: np.ndarray, groups: np.ndarray, names: Sequence[str], title: str) -> None:
    import matplotlib.pyplot as plt

    values = sorted(set(groups.tolist()))
    cmap = plt.get_cmap("tab10" if len(values) <= 10 else "tab20" if len(values) <= 20 else "turbo")
    for i, g in enumerate(values):
        sel = groups == g
        color = cmap(i % cmap.N) if len(values) <= 20 else cmap(i / max(1, len(values) - 1))
        label = names[g] if 0 <= g < len(names) else "none"
        ax.scatter(points[sel, 0], points[sel, 1], s=8, alpha=0.75, color=color, label=label, linewidths=0)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(values) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best", frameon=False, ncol=1 if len(values) <= 10 else 2)


def plot_embedding(points: np.ndarray, targets: np.ndarray, path: str, class_names: Optional[Sequence[str]] = None,
                   domains: Optional[np.ndarray] = None, domain_names: Optional[Sequence[str]] = None,
                   title: str = "features") -> str:
    """Write a PNG: the 2-D ``points`` coloured by class (and, with ``domains``, a second panel by domain)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = _labels_1d(targets)
    names = list(class_names) if class_names else [str(i) for i in range(int(labels.max()) + 1)]
    panels = 2 if domains is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 5), squeeze=False)
    _scatter(axes[0, 0], points, labels, names, f"{title}: by class")
    if domains is not None:
        domains = np.asarray(domains).astype(np.int64)
        dnames = list(domain_names) if domain_names else [f"domain {d}" for d in range(int(domains.max()) + 1)]
        _scatter(axes[0, 1], points, domains, dnames, f"{title}: by domain")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def log_image(trainer, key: str, path: str) -> list[str]:
    """Log a PNG to every logger of ``trainer`` that takes images (W&B, TensorBoard); returns their names."""
    logged = []
    for logger in getattr(trainer, "loggers", []) or []:
        if hasattr(logger, "log_image"):  # WandbLogger, NeptuneLogger
            logger.log_image(key=key, images=[path])
            logged.append(type(logger).__name__)
        elif type(logger).__name__ == "TensorBoardLogger":
            import matplotlib.image as mpimg

            logger.experiment.add_image(key, mpimg.imread(path)[..., :3], global_step=trainer.global_step,
                                        dataformats="HWC")
            logged.append(type(logger).__name__)
    return logged
