"""--ckpt_path (issue 15, items 1 and 7): another method's checkpoint stops the command, typed flags are never
dropped silently, a missing or truncated checkpoint is one sentence."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import FAST, REPO, read_metrics, run_cli
from fault_helpers import QUICK, experiment_overlay, one_error


@pytest.fixture(scope="module")
def feature_run(tmp_path_factory) -> Path:
    """A finished FeatureExtraction run (the quickstart's method) with lr 0.001."""
    run = tmp_path_factory.mktemp("fe") / "run"
    run_cli("fit", *QUICK, "--trainer.max_epochs=1", "--test_after_fit=false", f"--trainer.default_root_dir={run}")
    return run


def test_checkpoint_of_another_method_is_refused(feature_run, tmp_path, capsys):
    ckpt = feature_run / "checkpoints" / "last.ckpt"
    root = tmp_path / "finetune"
    msg = one_error(capsys, "fit", "--config", REPO / "configs/finetune/quickstart.yaml", *FAST,
                    "--config", experiment_overlay(tmp_path, root), f"--ckpt_path={ckpt}")
    assert "holds a FeatureExtraction model but the config trains FineTune" in msg
    assert not root.exists() or not any(root.iterdir())  # nothing trained, no run folder left
    msg = one_error(capsys, "test", "--config", REPO / "configs/adaptation/digits_offline.yaml", *FAST,
                    f"--trainer.default_root_dir={tmp_path / 't'}", f"--ckpt_path={ckpt}")
    assert "holds a FeatureExtraction model but the config trains DomainAdaptation" in msg


def test_typed_flag_is_applied_on_test_and_refused_on_resume(feature_run, tmp_path, capsys):
    ckpt = feature_run / "checkpoints" / "last.ckpt"
    assert yaml.safe_load((feature_run / "config.yaml").read_text())["model"]["init_args"]["lr"] == 0.001
    run_cli("test", *QUICK, f"--ckpt_path={ckpt}", "--model.lr=0.5", f"--trainer.default_root_dir={tmp_path / 't'}")
    assert "using --model.lr=0.5 from the command line instead of the checkpoint's lr=0.001" in capsys.readouterr().err
    tested = yaml.safe_load((tmp_path / "t" / "config.yaml").read_text())
    assert tested["model"]["init_args"]["lr"] == 0.5 and read_metrics(tmp_path / "t")["command"] == "test"

    msg = one_error(capsys, "fit", *QUICK, f"--ckpt_path={ckpt}", "--model.lr=0.5", "--trainer.max_epochs=2",
                    f"--trainer.default_root_dir={feature_run}")
    assert "--model.lr=0.5 differs from the checkpoint's lr=0.001" in msg and "drop the flag" in msg


def test_resuming_own_run_with_the_same_flags_still_works(feature_run, tmp_path):
    run = tmp_path / "copy"
    run_cli("fit", *QUICK, "--trainer.max_epochs=1", "--test_after_fit=false", f"--trainer.default_root_dir={run}")
    run_cli("fit", *QUICK, "--trainer.max_epochs=2", "--test_after_fit=false", "--model.lr=0.001",
            f"--trainer.default_root_dir={run}", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    assert [row["epoch"] for row in read_metrics(run)["history"]] == [0, 1]


def test_missing_and_truncated_checkpoints_are_one_sentence(feature_run, tmp_path, capsys):
    root = tmp_path / "exp"
    overlay = experiment_overlay(tmp_path, root)
    msg = one_error(capsys, "test", *QUICK, "--config", overlay, f"--ckpt_path={tmp_path / 'nope.ckpt'}")
    assert "nope.ckpt' does not exist" in msg
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((feature_run / "checkpoints" / "last.ckpt").read_bytes()[:4096])
    msg = one_error(capsys, "fit", *QUICK, "--config", overlay, f"--ckpt_path={truncated}")
    assert "truncated.ckpt' cannot be read" in msg and "truncated or not a Lightning checkpoint" in msg
    assert not root.exists() or not any(root.iterdir())


class _RunsCodeOnLoad:
    """A pickle that creates a file when it is unpickled (what weights_only=False would allow)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_source_checkpoint_loads_with_weights_only(tmp_path):
    import torch

    from tl_lightning.errors import TLError
    from tl_lightning.methods.adaptation import DomainAdaptation
    from tl_lightning.methods.source_stage import load_source_model

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCodeOnLoad(marker)}, evil)
    adapt = DomainAdaptation(backbone="digit_cnn", num_classes=10)
    with pytest.raises(TLError, match=r"cannot read source_checkpoint .*weights_only=True"):
        load_source_model(str(evil), adapt.features, adapt.classifier)
    assert not marker.exists()
    # a checkpoint the project writes (tensors only) still loads with weights_only=True
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {f"features.{k}": v for k, v in adapt.features.state_dict().items()} |
                {f"classifier.{k}": v for k, v in adapt.classifier.state_dict().items()}}, good)
    assert load_source_model(str(good), adapt.features, adapt.classifier) is not None


def test_feature_extraction_checkpoint_names_its_frozen_backbone_and_refuses_other_weights(feature_run, tmp_path,
                                                                                        capsys):
    """The checkpoint holds the head, not the 13.5 MB frozen backbone (``methods/lean_checkpoint.py``): loading
    rebuilds the backbone from the model's arguments, bit-identical, and other weights stop with one sentence."""
    import torch

    from tl_lightning.backbones import create_backbone
    from tl_lightning.errors import TLError
    from tl_lightning.methods import FeatureExtraction

    ckpt = feature_run / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert not any(key.startswith("extractor.model.") for key in saved["state_dict"])
    head = {key[len("head."):]: value for key, value in saved["state_dict"].items() if key.startswith("head.")}
    assert head and {"fne_mean", "fne_std"} <= set(saved["state_dict"])
    bundled = create_backbone("tf_efficientnet_lite0", "bundled", num_classes=0).state_dict()
    assert saved["frozen_backbone"]["weights"] == "bundled" and saved["frozen_backbone"]["tensors"] == len(bundled)
    assert ckpt.stat().st_size < 1_000_000  # was 13.5 MB with the backbone in it

    restored = FeatureExtraction.load_from_checkpoint(ckpt, map_location="cpu")
    assert all(torch.equal(restored.extractor.model.state_dict()[key], value) for key, value in bundled.items())
    assert all(torch.equal(restored.head.state_dict()[key], value) for key, value in head.items())

    other = tmp_path / "other.pt"  # the same architecture, one tensor changed
    torch.save(dict(bundled, **{"conv_stem.weight": bundled["conv_stem.weight"] * 1.01}), other)
    with pytest.raises(TLError, match="trained on tf_efficientnet_lite0 with weights 'bundled'"):
        FeatureExtraction.load_from_checkpoint(ckpt, map_location="cpu", weights=str(other))
    msg = one_error(capsys, "test", *QUICK, f"--ckpt_path={ckpt}", f"--model.weights={other}",
                    f"--trainer.default_root_dir={tmp_path / 't'}")
    assert "this checkpoint was trained on tf_efficientnet_lite0 with weights 'bundled'" in msg
    assert "--model.weights=bundled" in msg and not (tmp_path / "t" / "metrics.json").exists()
    # used as another model's backbone weights, the head-only checkpoint names the weights to pass instead
    with pytest.raises(TLError, match="holds a FeatureExtraction head, not backbone tensors.*--model.weights=bundled"):
        create_backbone("tf_efficientnet_lite0", str(ckpt), num_classes=0)
