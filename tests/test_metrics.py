"""VOC average precision: hand-computed cases for the 11-point (VOC2007) and area (VOC2010+) APs, ignored
("difficult") targets, tie order, and the torchmetrics Metric that build_metrics logs for multi-label tasks."""
import numpy as np
import pytest
import torch

from tl_lightning.methods.base import build_metrics
from tl_lightning.metrics import (MultilabelVOCAveragePrecision, average_precision, mean_average_precision,
                                  precision_recall)

# Ranked: + - + (difficult) - + ; 3 positives.
SCORES = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
TARGETS = torch.tensor([1, 0, 1, -1, 0, 1])


def test_precision_recall_skip_ignored_samples():
    precision, recall = precision_recall(SCORES, TARGETS)
    assert precision.tolist() == pytest.approx([1, 1 / 2, 2 / 3, 2 / 4, 3 / 5])
    assert recall.tolist() == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])


def test_voc07_eleven_point_ap_hand_computed():
    # precision  1, .5, .667, .5, .6 at recall 1/3, 1/3, 2/3, 2/3, 1
    # t = 0, .1, .2, .3 -> max precision at recall >= t = 1       (4 levels)
    # t = .4, .5, .6    -> max(.667, .5, .6) = 2/3               (3 levels)
    # t = .7 .. 1.0     -> .6                                    (4 levels)
    expected = (4 * 1 + 3 * (2 / 3) + 4 * 0.6) / 11
    assert average_precision(SCORES, TARGETS, "voc07") == pytest.approx(expected)
    assert expected == pytest.approx(0.763636, abs=1e-6)


def test_area_ap_uses_the_monotone_precision_envelope():
    # ranked + - - + + : precision 1, .5, .333, .5, .6 ; recall 1/3, 1/3, 1/3, 2/3, 1
    scores = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    targets = torch.tensor([1, 0, 0, 1, 1])
    # envelope at the recall steps: 1, max(.5, .6) = .6, .6  -> (1 + .6 + .6) / 3
    assert average_precision(scores, targets, "area") == pytest.approx((1 + 0.6 + 0.6) / 3)
    # 11-point: t <= .3 -> 1 ; t in .4...6 -> .6 ; t >= .7 -> .6
    assert average_precision(scores, targets, "voc07") == pytest.approx((4 * 1 + 7 * 0.6) / 11)
    # the first case: the envelope equals the raw precision at every recall step
    assert average_precision(SCORES, TARGETS, "area") == pytest.approx((1 + 2 / 3 + 0.6) / 3)


def test_ignored_sample_has_no_effect_whatever_its_score():
    for score in (10.0, 0.65, -10.0):
        scores = SCORES.clone()
        scores[3] = score
        assert average_precision(scores, TARGETS, "voc07") == pytest.approx(0.763636, abs=1e-6)


def test_ties_keep_input_order_as_the_devkit_sort():
    scores = torch.tensor([0.5, 0.5])
    assert average_precision(scores, torch.tensor([0, 1]), "voc07") == pytest.approx(0.5)
    assert average_precision(scores, torch.tensor([1, 0]), "voc07") == pytest.approx(1.0)


def test_perfect_and_class_without_positives():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.3]])
    targets = torch.tensor([[1, 0], [1, 0], [0, -1]])
    assert average_precision(scores[:, 0], targets[:, 0], "voc07") == pytest.approx(1.0)
    assert np.isnan(average_precision(scores[:, 1], targets[:, 1], "area"))
    assert mean_average_precision(scores, targets, "area") == pytest.approx(1.0)  # class 1 left out


def _voc_area_ap_reference(scores, targets):
    """A plain loop transcription of the devkit's VOCap on (score, target) pairs, target -1 skipped."""
    pairs = [(s, t) for s, t in zip(scores.tolist(), targets.tolist()) if t >= 0]
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i][0])
    npos = sum(t > 0 for _, t in pairs)
    tp = fp = 0
    rec, prec = [], []
    for i in order:
        tp += pairs[i][1] > 0
        fp += pairs[i][1] == 0
        rec.append(tp / npos)
        prec.append(tp / (tp + fp))
    mrec, mpre = [0.0] + rec + [1.0], [0.0] + prec + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i] - mrec[i - 1]) * mpre[i] for i in range(1, len(mrec)) if mrec[i] != mrec[i - 1])


def test_area_ap_matches_a_loop_transcription_of_the_devkit():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        scores = torch.rand(40, generator=g)
        targets = torch.randint(-1, 2, (40,), generator=g)
        assert average_precision(scores, targets, "area") == pytest.approx(_voc_area_ap_reference(scores, targets))


def test_metric_accumulates_batches_and_build_metrics_logs_both():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(30, 4, generator=g)
    targets = torch.randint(-1, 2, (30, 4), generator=g)
    targets[0] = 1  # every class has a positive
    metric = MultilabelVOCAveragePrecision(4, method="voc07")
    metric.update(scores[:12], targets[:12])
    metric.update(scores[12:], targets[12:])
    assert metric.compute().item() == pytest.approx(mean_average_precision(scores, targets, "voc07"), abs=1e-6)

    collection = build_metrics(4, multilabel=True)
    collection.update(scores, targets)
    out = collection.compute()
    assert set(out) == {"mAP", "mAP_voc07"}
    assert out["mAP"].item() == pytest.approx(mean_average_precision(scores, targets, "area"), abs=1e-6)
    assert out["mAP_voc07"].item() == pytest.approx(mean_average_precision(scores, targets, "voc07"), abs=1e-6)
    assert out["mAP"].item() != pytest.approx(out["mAP_voc07"].item())


def test_metric_rejects_wrong_shapes():
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        MultilabelVOCAveragePrecision(4).update(torch.zeros(3, 5), torch.zeros(3, 5))
