"""Image retrieval with cached features: nearest neighbours in "code space".

CS231n shows that images whose CNN codes are close look alike; Razavian et al. (2014) use the same
off-the-shelf features for instance retrieval. ``python -m tl_lightning retrieve --config X.yaml`` embeds a
gallery split and a query split with the config's ``FeatureExtraction`` model (cached features, ``tta_views``,
FNE and L2 normalisation as configured), ranks the gallery for every query and reports

* ``recall@k``: share of queries with at least one relevant image among their k nearest neighbours;
* ``mAP@k``: mean over queries of AP@k = sum_{i<=k} P(i) rel(i) / min(k, R), R = relevant images in the gallery.

An image is relevant when it has the query's class (multi-label: shares at least one positive label). When
gallery and queries are the same split a query is not its own neighbour. Results go to
``<out>/retrieval.json`` and a grid of queries and their neighbours to ``<out>/retrieval.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from tl_lightning.atomic import save_figure, write_text
from tl_lightning.errors import TLError

SPLITS = ("train", "val", "test")


def similarity(query: torch.Tensor, gallery: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """[Q, G] similarities: cosine, or negative Euclidean distance."""
    query, gallery = query.double(), gallery.double()
    if metric == "cosine":
        return F.normalize(query, dim=1) @ F.normalize(gallery, dim=1).T
    if metric == "euclidean":
        return -torch.cdist(query, gallery)
    raise TLError(f"unknown retrieval metric '{metric}'; use cosine or euclidean.")


def relevance(query_targets: torch.Tensor, gallery_targets: torch.Tensor) -> torch.Tensor:
    """[Q, G] booleans: same class, or (multi-label) at least one shared positive label."""
    if query_targets.ndim == 1:
        return query_targets[:, None] == gallery_targets[None, :]
    return ((query_targets > 0).double() @ (gallery_targets > 0).double().T) > 0


def nearest(sim: torch.Tensor, k: int, exclude_self: bool = False) -> torch.Tensor:
    """[Q, k] gallery indices, most similar first (ties: lower index first)."""
    if k < 1 or k > sim.shape[1] - int(exclude_self):
        raise TLError(f"k must be between 1 and the gallery size ({sim.shape[1] - int(exclude_self)}); got {k}.")
    sim = sim.clone()
    if exclude_self:
        sim.fill_diagonal_(-float("inf"))
    order = torch.from_numpy(np.argsort(-sim.numpy(), axis=1, kind="stable"))
    return order[:, :k]


def retrieval_metrics(neighbours: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int],
                      exclude_self: bool = False) -> dict:
    """recall@k and mAP@k for every k in ``ks`` from [Q, K] neighbours and the [Q, G] relevance matrix."""
    rel = relevant.clone().bool()
    if exclude_self:
        rel.fill_diagonal_(False)
    hits = torch.gather(rel, 1, neighbours).double()  # [Q, K]
    total_relevant = rel.sum(1).double()  # R per query
    out = {}
    for k in ks:
        h = hits[:, :k]
        out[f"recall@{k}"] = float(h.amax(1).mean()) if len(h) else 0.0
        precision_at_i = h.cumsum(1) / torch.arange(1, k + 1, dtype=torch.float64)
        ap = (precision_at_i * h).sum(1) / total_relevant.clamp(max=k).clamp(min=1)
        out[f"mAP@{k}"] = float(ap.mean()) if len(ap) else 0.0
    return out


def plot_grid(query_set, gallery_set, query_ids: Sequence[int], neighbours: torch.Tensor, relevant: torch.Tensor,
              class_names: Sequence[str], path: str) -> str:
    """PNG: one row per query (first column), then its neighbours framed green (relevant) or red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    raw_q, raw_g = query_set.with_transform(None), gallery_set.with_transform(None)
    k = neighbours.shape[1]
    fig, axes = plt.subplots(len(query_ids), k + 1, figsize=(1.6 * (k + 1), 1.75 * len(query_ids)), squeeze=False)

    def label(y) -> str:
        y = np.asarray(y)
        idx = [int(y)] if y.ndim == 0 else np.flatnonzero(y > 0).tolist()
        return ",".join(class_names[i] if i < len(class_names) else str(i) for i in idx)[:18]

    for row, q in enumerate(query_ids):
        img, y = raw_q[q]
        ax = axes[row, 0]
        ax.imshow(img)
        ax.set_title(f"query: {label(y)}", fontsize=7)
        for j in range(k):
            g = int(neighbours[q, j])
            gimg, gy = raw_g[g]
            ax = axes[row, j + 1]
            ax.imshow(gimg)
            ax.set_title(f"#{j + 1} {label(gy)}", fontsize=7)
            color = "tab:green" if bool(relevant[q, g]) else "tab:red"
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tl_lightning retrieve", allow_abbrev=False,
        description="k-NN retrieval with a FeatureExtraction config's cached features. Arguments not listed "
                    "here (--config, --model.*, --data.*, --trainer.*) go to the usual config parser.")
    p.add_argument("--k", type=int, default=5, help="neighbours per query (default 5)")
    p.add_argument("--gallery", choices=SPLITS, default="train", help="split to search (default train)")
    p.add_argument("--query", choices=SPLITS, default="test", help="split of the queries (default test)")
    p.add_argument("--metric", choices=("cosine", "euclidean"), default="cosine")
    p.add_argument("--num_queries", type=int, default=8, help="queries drawn in the PNG grid (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the queries drawn in the grid")
    p.add_argument("--out", default=None, help="output folder (default <trainer.default_root_dir>/retrieval)")
    return p


def retrieve(model, dm, k: int = 5, gallery: str = "train", query: str = "test", metric: str = "cosine",
             num_queries: int = 8, seed: int = 0, out: str = "retrieval") -> dict:
    """Embed ``gallery`` and ``query`` splits (the DataModule's served features), rank, score, plot."""
    dm.setup("fit")
    model.served(dm, required="retrieve")
    if model.embedding == "fne":
        model.fit_fne_statistics(dm.feature_matrices("train"))
    xq, yq = model.embedded(dm.feature_matrices(query))
    xg, yg = (xq, yq) if gallery == query else model.embedded(dm.feature_matrices(gallery))
    exclude_self = gallery == query
    sim = similarity(xq, xg, metric)
    neighbours = nearest(sim, k, exclude_self)
    rel = relevance(yq, yg)
    ks = sorted({1, k})
    metrics = retrieval_metrics(neighbours, rel, ks, exclude_self)
    rng = np.random.default_rng(seed)
    shown = sorted(rng.choice(len(xq), size=min(num_queries, len(xq)), replace=False).tolist())
    qset, gset = dm.split_dataset(query, deterministic=True), dm.split_dataset(gallery, deterministic=True)
    png = plot_grid(qset, gset, shown, neighbours, rel, model.class_names, os.path.join(out, "retrieval.png"))
    payload = {
        "metrics": metrics, "k": k, "gallery": gallery, "query": query, "metric": metric,
        "num_gallery": len(xg), "num_queries": len(xq), "tta_views": model.tta_views, "grid": png,
        "examples": [{"query": qset.describe(q), "neighbours": [gset.describe(int(g)) for g in neighbours[q]]}
                     for q in shown],
    }
    os.makedirs(out, exist_ok=True)
    write_text(os.path.join(out, "retrieval.json"), json.dumps(payload, indent=2))
    return payload


def main(argv: Optional[list[str]] = None) -> dict:
    from tl_lightning.cli import run_cli
    from tl_lightning.methods.feature_extraction import FeatureExtraction

    args, rest = build_parser().parse_known_args(argv)
    if args.k < 1 or args.num_queries < 1:
        raise TLError("--k and --num_queries must be at least 1.")
    with warnings.catch_warnings():  # argv is handed on on purpose, not mixed up with sys.argv
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        cli = run_cli(rest, run=False)
    model, dm = cli.model, cli.datamodule
    if not isinstance(model, FeatureExtraction):
        raise TLError(f"retrieve needs a FeatureExtraction model (model.class_path); the config gives "
                      f"{type(model).__name__}.")
    model.to(cli.trainer.strategy.root_device)
    out = args.out or os.path.join(cli.trainer.default_root_dir, "retrieval")
    payload = retrieve(model, dm, args.k, args.gallery, args.query, args.metric, args.num_queries, args.seed, out)
    width = max(len(m) for m in payload["metrics"])
    print(f"\nRetrieval ({payload['num_queries']} {args.query} queries, {payload['num_gallery']} {args.gallery} "
          f"gallery images, {args.metric})")
    for name, value in payload["metrics"].items():
        print(f"{name.ljust(width)} | {value:.4f}")
    print(f"{'grid'.ljust(width)} | {payload['grid']}\n{'json'.ljust(width)} | {os.path.join(out, 'retrieval.json')}")
    return payload
