"""Test-time augmentation (Razavian's "aug"): the views FeatureExtraction averages its features over, how they
are extracted, cached and averaged, and what the averaging costs in memory. Real components: scikit-learn's digits
through a real backbone (``digit_cnn`` at 32 px, random init), the real feature cache and the CLI's DataModule."""
from __future__ import annotations

import pytest
import torch

from helpers import REPO
from test_shallow_heads import SVM_CONFIG, build
from tl_lightning.errors import TLError
from tl_lightning.tta import ViewTransform, view_transforms


def test_tta_extracts_and_caches_the_configured_number_of_views(tmp_path):
    views = 3
    # a split seed no other test uses: the in-process cache memo must not already hold these features
    model, dm = build(SVM_CONFIG, f"--model.tta_views={views}", f"--model.cache_dir={tmp_path}", "--data.seed=9")
    source = dm.served_features.source  # the data side's own copy of the backbone extracts
    seen = []
    stem = source.model.get_submodule(source.model.pretrained_cfg["first_conv"])
    stem.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    feats = dm.feature_matrices("val")
    n = len(dm.split_dataset("val"))
    assert sum(seen) == views * n, "every view of every image goes through the backbone once"
    assert len(list((tmp_path / "features").glob("*.pt"))) == views, "one cache file per view"

    base = dm.split_dataset("val", deterministic=True)
    per_view = [source.extract_readouts("val", base.with_transform(t), dm.make_loader,
                                        {model.readout: model.readout})[model.readout]
                for t in view_transforms(base.transform, views, flips=False)]
    assert sum(seen) == views * n, "the views come from the cache the second time"
    assert torch.allclose(feats[model.readout], torch.stack(per_view).mean(0))
    assert not torch.allclose(per_view[0], per_view[1]), "views are different crops"
    assert not torch.allclose(per_view[1], per_view[2])

    seen.clear()
    _, again = build(SVM_CONFIG, f"--model.tta_views={views}", f"--model.cache_dir={tmp_path}", "--data.seed=9")
    again_source = again.served_features.source
    again_stem = again_source.model.get_submodule(again_source.model.pretrained_cfg["first_conv"])
    again_stem.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    again.feature_matrices("val")  # a new run: every view from the cache
    assert seen == []


AVERAGE_VIEWS = """
import sys
import torch
sys.path.insert(0, "tests")
from test_tta_views import SVM_CONFIG, build
from tl_lightning.backbones.features import resolve_layers
from tl_lightning.tta import view_transforms

mode, views, dim = sys.argv[2], 3, 150_000
model, dm = build(SVM_CONFIG, f"--model.tta_views={views}", f"--model.cache_dir={sys.argv[1]}", "--data.seed=11")
source, base = dm.served_features.source, dm.split_dataset("val", deterministic=True)
layers = resolve_layers(source.model, model.readout)
planted = []
keys = [source.key(base.with_transform(view), layers) for view in view_transforms(base.transform, views, flips=False)]
for i, key in enumerate(keys):  # large planted views, one at a time
    planted.append(torch.full((len(base), dim), float(i + 1)))
    source.cache.save(key, {"features": planted[-1], "targets": torch.as_tensor(base.targets)})
unit = planted[0].numel() * 4 / 2**20  # MB of one view's matrix
status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 2**10
if mode == "retained":  # a later run: the views are in their cache files only
    del planted
    type(source.cache)._memo.clear()
    before = status("VmRSS")
    feats = dm.feature_matrices("val")[model.readout]
    added = status("VmRSS") - before
else:
    held = [source.cache.load(key) for key in keys]  # in memory (and in the memo while held), as after extracting
    planted = [entry["features"] for entry in held]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident memory (VmHWM) to the current one: the planting is not counted
    before = status("VmHWM")
    feats = dm.feature_matrices("val")[model.readout]
    added = status("VmHWM") - before
    assert all(torch.equal(p, torch.full_like(p, i + 1.0)) for i, p in enumerate(planted)), "the views are unchanged"
assert torch.equal(feats, torch.full_like(feats, 2.0)), "the mean of the views 1, 2 and 3"
print(f"ADDED {added / unit:.2f}")
"""


@pytest.mark.parametrize("mode", ["peak", "retained"])
def test_averaging_views_keeps_one_matrix_not_every_view(tmp_path, mode):
    """The served matrix is the mean of the views' cached matrices, summed as they arrive (``peak``: the averaging
    adds about one matrix to the process's peak memory, not a stacked copy of every view plus its mean, 4 for 3
    views), and the feature cache's in-process memo does not keep the views alive once averaged (``retained``:
    one matrix stays, not 4). With the shipped two views on full CUB's train split and ``auto``'s two read-outs,
    0.9 GB less at the peak and 0.9 GB less held. Each in its own process, so that its memory is this call's
    (``VmHWM``, reset before the call, or ``VmRSS``)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", AVERAGE_VIEWS, str(tmp_path), mode], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    added = float(proc.stdout.split("ADDED")[1])
    assert added < 1.5, f"averaging 3 views added {added:.2f} view-sized matrices ({mode})"


def test_view_transforms_crop_and_flip():
    assert len(view_transforms(None, 12, flips=True)) == 12
    assert len(view_transforms(None, 6, flips=False)) == 6
    with pytest.raises(TLError, match="tta_views"):
        view_transforms(None, 7, flips=False)
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 8, 8)
    assert torch.equal(ViewTransform("full", flip=True)(x), x.flip(-1))
    top_left = ViewTransform("top_left", crop=0.5)(x)
    assert top_left.shape == x.shape
    expected = torch.nn.functional.interpolate(x[None, :, :4, :4], size=(8, 8), mode="bilinear",
                                               align_corners=False, antialias=True)[0]
    assert torch.allclose(top_left, expected)
    assert "top_left" in repr(ViewTransform("top_left")) and repr(ViewTransform("center")) != repr(ViewTransform("top_left"))
