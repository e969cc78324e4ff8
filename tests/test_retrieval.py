"""k-NN retrieval with cached features: hand-computed metrics, and the ``retrieve`` subcommand end to end."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.neighbors import NearestNeighbors

from helpers import FAST, REPO, run_cli
from tl_lightning.errors import TLError
from tl_lightning.retrieval import nearest, relevance, retrieval_metrics, similarity

CONFIG = REPO / "configs/feature_extraction/svm_quickstart.yaml"
SMALL = ("--model.backbone=digit_cnn", "--model.weights=none", "--data.image_size=32", "--data.batch_size=128")


def test_recall_and_map_match_a_hand_computed_case():
    # gallery on a line: g0=(1,0) class 0, g1=(0.9,0.1) class 1, g2=(0,1) class 1, g3=(0.7,0.7) class 0
    gallery = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.7]])
    g_labels = torch.tensor([0, 1, 1, 0])
    # q0=(1,0.05) class 0 -> by cosine: g0, g1, g3, g2 ; q1=(0.1,1) class 0 -> g2, g3, g1, g0
    query = torch.tensor([[1.0, 0.05], [0.1, 1.0]])
    q_labels = torch.tensor([0, 0])
    nb = nearest(similarity(query, gallery, "cosine"), k=3)
    assert nb.tolist() == [[0, 1, 3], [2, 3, 1]]
    m = retrieval_metrics(nb, relevance(q_labels, g_labels), ks=[1, 3])
    # recall@1: q0 hit (g0 is class 0), q1 miss (g2 is class 1) -> 1/2
    assert m["recall@1"] == pytest.approx(0.5)
    # recall@3: both have a class-0 image among three -> 1
    assert m["recall@3"] == pytest.approx(1.0)
    # AP@3, R = 2 relevant in the gallery for both queries:
    #   q0 hits at ranks 1 and 3: (1/1 + 2/3) / 2 = 5/6 ; q1 hit at rank 2: (1/2) / 2 = 1/4
    assert m["mAP@3"] == pytest.approx((5 / 6 + 1 / 4) / 2)
    assert m["mAP@1"] == pytest.approx(0.5)


def test_euclidean_leave_one_out_and_multilabel_relevance():
    x = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    y = torch.tensor([0, 1, 0, 1])
    nb = nearest(similarity(x, x, "euclidean"), k=1, exclude_self=True)
    assert nb[:, 0].tolist() == [1, 0, 1, 2]  # nobody is its own neighbour
    m = retrieval_metrics(nb, relevance(y, y), ks=[1], exclude_self=True)
    assert m["recall@1"] == pytest.approx(0.0)  # every nearest other point has the other class

    multi = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 1.0, 0.0]])
    assert relevance(multi, multi).tolist() == [
        [True, False, True, False], [False, True, False, True], [True, False, True, False], [False, True, False, True]]
    with pytest.raises(TLError, match="k must be between"):
        nearest(similarity(x, x), k=4, exclude_self=True)


def test_retrieve_subcommand_writes_metrics_and_a_grid(tmp_path):
    out = tmp_path / "retrieval"
    run_cli("retrieve", "--k", "3", "--num_queries", "4", "--out", out, "--config", CONFIG, *FAST, *SMALL,
            f"--trainer.default_root_dir={tmp_path}")
    payload = json.loads((out / "retrieval.json").read_text())
    m = payload["metrics"]
    assert set(m) == {"recall@1", "mAP@1", "recall@3", "mAP@3"}
    assert 0 < m["recall@1"] <= m["recall@3"] <= 1
    assert len(payload["examples"]) == 4 and all(len(e["neighbours"]) == 3 for e in payload["examples"])
    with Image.open(out / "retrieval.png") as img:
        width, height = img.size
    assert (width, height) == (160 * 4, 175 * 4)  # four rows (queries) of 1 + 3 images

    # recall@1 independently: scikit-learn's cosine nearest neighbour on the same cached embeddings
    from tl_lightning.cli import run_cli as make_cli

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = make_cli(["--config", str(CONFIG), *FAST, *SMALL], run=False)
    cli.datamodule.setup("fit")
    if cli.model.embedding == "fne":
        cli.model.fit_fne_statistics(cli.datamodule.feature_matrices("train"))
    xg, yg = cli.model.embedded(cli.datamodule.feature_matrices("train"))
    xq, yq = cli.model.embedded(cli.datamodule.feature_matrices("test"))
    idx = NearestNeighbors(n_neighbors=1, metric="cosine").fit(xg.numpy()).kneighbors(xq.numpy())[1][:, 0]
    assert m["recall@1"] == pytest.approx(float(np.mean(yg.numpy()[idx] == yq.numpy())), abs=1e-9)


def test_retrieve_rejects_a_bad_k(capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli("retrieve", "--k", "0", "--config", CONFIG, *FAST, *SMALL)
    assert exc.value.code == 2
    assert "--k" in capsys.readouterr().err
