"""Bad input (issue 15, item 7): one sentence that names the problem and the fix, exit 2, no run folder left."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import FAST, REPO
from fault_helpers import QUICK, experiment_overlay, one_error
from helpers.tmpfs import mounted_tmpfs
from tl_lightning.errors import TLError


def nothing_under(root: Path) -> bool:
    return not root.exists() or not any(root.iterdir())


@pytest.mark.parametrize("flag, expected", [
    ("--model.lr=fast", "error: --model.lr=fast is not a valid float for FeatureExtraction's lr"),
    ("--model.lrr=1", "error: --model.lrr is not an option of FeatureExtraction; did you mean --model.lr?"),
    ("--data.batch_size=-4", "error: --data.batch_size must be a positive number of samples per batch, got -4"),
    ("--model.channels_last=maybe",  # a union of bool and a literal: every accepted value is named
     "error: --model.channels_last=maybe is not accepted by FeatureExtraction's channels_last; give one of: true, "
     "false, auto."),
])
def test_bad_values_name_the_option(tmp_path, capsys, flag, expected):
    root = tmp_path / "exp"
    msg = one_error(capsys, "fit", *QUICK, "--config", experiment_overlay(tmp_path, root), flag)
    assert msg.startswith(expected), msg
    assert nothing_under(root)


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epochs: 3\n   oops: [\n")
    msg = one_error(capsys, "fit", *QUICK, "--config", bad)
    assert f"'{bad}' is not valid YAML" in msg and "line 3" in msg and "<unicode string>" not in msg


@pytest.fixture
def read_only_dir(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as folder:
        yield folder


def test_read_only_run_folder_is_one_sentence(tmp_path, capsys, read_only_dir):
    msg = one_error(capsys, "fit", *QUICK, f"--trainer.default_root_dir={read_only_dir / 'run'}")
    assert "Read-only file system" in msg and "writable" in msg
    msg = one_error(capsys, "fit", *QUICK, "--config", experiment_overlay(tmp_path, read_only_dir / "exp"))
    assert "Read-only file system" in msg and "writable folder" in msg


def test_labelled_per_class_at_the_largest_class_is_refused(tmp_path, capsys):
    root = tmp_path / "exp"
    msg = one_error(capsys, "fit", "--config", REPO / "configs/adaptation/digits_offline.yaml", *FAST,
                    "--config", experiment_overlay(tmp_path, root), "--data.labelled_per_class=100000")
    assert "labelled_per_class=100000 labels every target training sample" in msg and "use a value below" in msg
    assert nothing_under(root)


def test_labelled_per_class_above_the_smallest_class_warns_naming_it():
    from tl_lightning.data.domains import DomainPairDataModule

    pair = SimpleNamespace(target=SimpleNamespace(class_names=["zero", "one", "two"]))
    targets = np.array([0] * 10 + [1] * 3 + [2] * 10)
    with pytest.warns(UserWarning, match=r"labelled_per_class=5: target class 'one' has only 3 training samples"):
        DomainPairDataModule._check_labelled_per_class(pair, targets, 5)


@pytest.mark.parametrize("args, expected", [
    (["--devices", "-3"], "--devices -3 must be at least 1"),
    (["--time", "soon"], "--time soon is not a SLURM time limit"),
])
def test_submit_checks_slurm_values_before_writing(tmp_path, args, expected):
    from tl_lightning import slurm

    root = tmp_path / "runs"
    with pytest.raises(TLError, match=expected):
        slurm.main(["--config", str(REPO / "configs/quickstart.yaml"), "--run-root", str(root), *args])
    assert not root.exists()


def test_submit_checks_fit_overrides_before_writing(tmp_path, capsys):
    from tl_lightning import slurm

    root = tmp_path / "runs"
    with pytest.raises(SystemExit) as exc:
        slurm.main(["--config", str(REPO / "configs/quickstart.yaml"), "--run-root", str(root), "--model.lrr=1"])
    assert exc.value.code == 2
    assert "error: --model.lrr is not an option of FeatureExtraction; did you mean --model.lr?" in capsys.readouterr().err
    assert not root.exists()


def test_sweep_yaml_syntax_error_gives_the_line(tmp_path):
    from tl_lightning.sweep import load_sweep

    bad = tmp_path / "sweep.yaml"
    bad.write_text("method: grid\nmetric:\n  name: val/acc\n   goal: maximize\n")
    with pytest.raises(TLError, match=r"sweep file '.*sweep.yaml' is not valid YAML: .* at line 4, column"):
        load_sweep(str(bad))


def test_a_truncated_gzip_archive_is_one_sentence_and_leaves_no_partial_file(tmp_path):
    import gzip

    import pytest

    from tl_lightning.data.ondisk import gunzip
    from tl_lightning.errors import TLError

    payload = bytes(range(256)) * 4096  # 1 MiB
    whole = tmp_path / "train-images-idx3-ubyte.gz"
    whole.write_bytes(gzip.compress(payload))
    gunzip(str(whole), str(tmp_path / "whole"))
    assert (tmp_path / "whole").read_bytes() == payload

    cut = tmp_path / "cut.gz"
    cut.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])  # a download that stopped half-way
    with pytest.raises(TLError, match=r"^cannot unpack '.*cut\.gz' \(EOFError: .*\); replace it with the official"):
        gunzip(str(cut), str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gz", "train-images-idx3-ubyte.gz", "whole"]


@pytest.mark.parametrize("spec, reason", [
    ({"class_path": "torch.nn.Linear"}, "does not correspond to a subclass of UnfreezeStrategy"),
    ({"class_path": "tl_lightning.callbacks.unfreeze.FreezeUnfreeze", "init_args": {"unfreeze_at": 2}},
     "Option 'unfreeze_at' is not accepted"),
    ({"class_path": "tl_lightning.callbacks.unfreeze.Nope"}, "has no attribute 'Nope'"),
])
def test_a_bad_unfreeze_class_path_is_one_sentence_before_anything_is_built(spec, reason):
    from tl_lightning.callbacks.unfreeze import make_strategy

    with pytest.raises(TLError, match=r"^cannot build an unfreeze strategy from '[\w.]+' \(") as e:
        make_strategy(spec)
    assert reason in str(e.value) and str(e.value).endswith("or a subclass of UnfreezeStrategy.")
    assert make_strategy({"class_path": "tl_lightning.callbacks.unfreeze.FreezeUnfreeze",
                          "init_args": {"unfreeze_at_epoch": 3}}).unfreeze_at_epoch == 3


def test_a_domain_pair_with_a_bad_child_class_path_is_one_sentence():
    from tl_lightning.data.domains import build_datamodule

    with pytest.raises(TLError, match=r"cannot build a DataModule from 'tl_lightning.data.DigitsDataModule' "
                                      r"\(.*Option 'sede' is not accepted.*\); check its class_path and init_args\."):
        build_datamodule({"class_path": "tl_lightning.data.DigitsDataModule", "init_args": {"sede": 1}})
    built = build_datamodule({"class_path": "tl_lightning.data.DigitsDataModule", "init_args": {"seed": 4}})
    assert type(built).__name__ == "DigitsDataModule" and built.seed == 4
