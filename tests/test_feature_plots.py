"""2-D embeddings of features (PCA, t-SNE) and their PNGs, by class and by domain."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from tl_lightning.errors import TLError
from tl_lightning.plots import embed_2d, plot_embedding


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return d.data[:300], d.target[:300]


def test_pca_embedding_is_the_top_two_principal_directions(digits):
    x, _ = digits
    points = embed_2d(x, "pca")
    centred = x - x.mean(0)
    top = np.linalg.svd(centred, full_matrices=False)[2][:2]
    expected = centred @ top.T
    assert points.shape == (300, 2)
    assert np.allclose(np.abs(points), np.abs(expected), atol=1e-6)  # up to the sign of each axis


def test_tsne_keeps_classes_apart(digits):
    x, y = digits
    points = embed_2d(x, "tsne", seed=0)
    assert points.shape == (300, 2)
    # nearest neighbour in the 2-D map mostly shares the class (t-SNE keeps local structure)
    d = ((points[:, None] - points[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    assert (y[d.argmin(1)] == y).mean() > 0.8
    with pytest.raises(TLError, match="unknown embedding method"):
        embed_2d(x, "umap")


def test_plot_by_class_and_by_domain(tmp_path, digits):
    x, y = digits
    points = embed_2d(x, "pca")
    one = plot_embedding(points, y, str(tmp_path / "class.png"), class_names=[str(i) for i in range(10)])
    domains = (np.arange(len(y)) % 2)
    two = plot_embedding(points, y, str(tmp_path / "domain.png"), domains=domains, domain_names=["source", "target"])
    with Image.open(one) as a, Image.open(two) as b:
        assert a.size == (605, 550) and b.size == (1210, 550)  # a second panel for the domains
        # the domain panel is not blank: it holds the two domain colours
        right = np.asarray(b.convert("RGB"))[:, 640:]
        assert len(np.unique(right.reshape(-1, 3), axis=0)) > 10
    # multi-label targets are coloured by their first positive label
    multi = np.stack([y % 2 == 0, y > 4], 1).astype(float)
    plot_embedding(points, multi, str(tmp_path / "multi.png"))
    assert (tmp_path / "multi.png").stat().st_size > 5000
