"""The CLI: fit/validate/test/predict, config layering and overrides, links, run results, clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fault_helpers import cli, one_error
from helpers import FAST, REPO, read_metrics, run_cli

QUICK = ("--config", str(REPO / "configs/quickstart.yaml"), "--data.image_size=32", "--trainer.max_epochs=3",
         "--model.embedding=pooled", "--model.lr=0.01", *FAST)


@pytest.fixture(scope="module")
def fitted_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("quick") / "run"
    run_cli("fit", *QUICK, f"--trainer.default_root_dir={run_dir}")
    return run_dir


def test_fit_tests_the_best_checkpoint_and_writes_metrics_json(fitted_run):
    m = read_metrics(fitted_run)
    assert m["command"] == "fit"
    assert 0.5 < m["metrics"]["test/acc"] <= 1.0  # 10 classes: chance is 0.1
    assert 0.0 <= m["metrics"]["val/acc"] <= 1.0 and m["metrics"]["train/loss"] > 0
    assert Path(m["best_checkpoint"]).is_file() and "best" in Path(m["best_checkpoint"]).name
    assert m["test_checkpoint"] == "best" and m["tested_checkpoint"] == m["best_checkpoint"]
    assert Path(m["config"]).is_file() and m["wall_time_s"] > 0
    assert m["class_names"] == [str(i) for i in range(10)]
    assert len(m["history"]) == 3 and m["best_score"] == pytest.approx(max(h["val/acc"] for h in m["history"]))
    assert (fitted_run / "learning_curves.png").stat().st_size > 1000


def test_test_checkpoint_last_tests_the_final_weights(fitted_run, tmp_path):
    """``--test_checkpoint=last``: fit tests ``last.ckpt`` (the end of an annealed schedule), says so in
    metrics.json, and its test metrics are those of a separate ``test`` of that file."""
    run = tmp_path / "run"
    run_cli("fit", *QUICK, "--test_checkpoint=last", f"--trainer.default_root_dir={run}")
    m = read_metrics(run)
    assert m["test_checkpoint"] == "last" and m["tested_checkpoint"] == str(run / "checkpoints" / "last.ckpt")
    assert "best" in Path(m["best_checkpoint"]).name  # the best checkpoint is still kept and reported
    run_cli("test", *QUICK, f"--ckpt_path={m['tested_checkpoint']}", f"--trainer.default_root_dir={tmp_path / 't'}")
    again = read_metrics(tmp_path / "t")["metrics"]
    assert m["metrics"]["test/loss"] == pytest.approx(again["test/loss"], rel=1e-6)


def test_saved_config_records_overrides_and_a_fresh_run_never_overwrites(fitted_run, capsys):
    saved = yaml.safe_load((fitted_run / "config.yaml").read_text())
    assert saved["model"]["init_args"]["lr"] == 0.01 and saved["data"]["init_args"]["image_size"] == 32
    before = (fitted_run / "metrics.json").read_bytes()
    with pytest.raises(SystemExit) as exc:  # a typed run folder holding a finished run is not reused
        run_cli("fit", *QUICK, "--trainer.max_epochs=1", "--test_after_fit=false",
                f"--trainer.default_root_dir={fitted_run}")
    assert exc.value.code == 2 and "already holds a finished run" in capsys.readouterr().err
    assert (fitted_run / "metrics.json").read_bytes() == before


def test_validate_test_and_predict_from_a_checkpoint(fitted_run, tmp_path):
    ckpt = read_metrics(fitted_run)["best_checkpoint"]
    run_cli("test", *QUICK, f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp_path / 't'}")
    tested = read_metrics(tmp_path / "t")
    assert tested["command"] == "test" and tested["metrics"]["test/acc"] > 0.5
    run_cli("validate", *QUICK, f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp_path / 'v'}")
    assert "val/acc" in read_metrics(tmp_path / "v")["metrics"]
    run_cli("predict", *QUICK, f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp_path / 'p'}")
    rows = (tmp_path / "p" / "predictions.csv").read_text().splitlines()
    from tl_lightning.data.digits import DigitsDataModule

    n_test = len(DigitsDataModule(image_size=32).split_dataset("test"))
    assert rows[0].split(",")[:2] == ["file", "class"] and len(rows) == 1 + n_test  # header + the test split


def test_links_layering_and_dotted_overrides(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("trainer:\n  max_epochs: 7\nmodel:\n  init_args:\n    backbone: digit_cnn\n    weights: none\n")
    from tl_lightning.cli import run_cli as build

    cli_obj = build(["--config", str(REPO / "configs/quickstart.yaml"), "--config", str(extra),
                     "--model.lr=0.25", "--data.batch_size=7", "--data.image_size=null"], run=False)
    assert cli_obj.trainer.max_epochs == 7
    assert cli_obj.model.lr == 0.25 and cli_obj.datamodule.batch_size == 7
    assert cli_obj.model.num_classes == 10 and cli_obj.model.multilabel is False  # linked from the data
    assert cli_obj.datamodule.backbone == "digit_cnn"  # linked from the model
    assert cli_obj.datamodule.data_config()["input_size"] == (3, 32, 32)


def test_print_config_shows_the_layered_config():
    out = cli("fit", "--config", "configs/quickstart.yaml", "--model.lr=0.5", "--print_config")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["model"]["init_args"]["lr"] == 0.5
    assert cfg["model"]["class_path"] == "tl_lightning.methods.FeatureExtraction"
    assert "num_classes" not in cfg["model"]["init_args"] or cfg["model"]["init_args"]["num_classes"] is None \
        or isinstance(cfg["model"]["init_args"]["num_classes"], int)


def test_a_forked_run_resolves_the_same_config_as_a_fresh_interpreter():
    """The suite forks its runs from a preloaded server (``helpers.launch``): what they resolve (defaults read from
    the environment, sys.argv, the working directory, links) must be what ``python -m tl_lightning`` resolves."""
    import subprocess
    import sys

    args = ("fit", "--config", "configs/quickstart.yaml", "--model.lr=0.5", "--print_config")
    forked = cli(*args)
    fresh = subprocess.run([sys.executable, "-m", "tl_lightning", *args], cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert forked.returncode == fresh.returncode == 0, fresh.stderr[-2000:]
    assert yaml.safe_load(forked.stdout) == yaml.safe_load(fresh.stdout)
    assert yaml.safe_load(fresh.stdout)["model"]["init_args"]["lr"] == 0.5


@pytest.mark.parametrize("extra, message", [
    ("model:\n  init_args:\n    lr: [oops\n", "is not valid YAML: "),
    ("trainer:\n  max_epochz: 3\n", "does not accept option 'trainer.max_epochz'"),
    ("model:\n  init_args:\n    backbone: resnet5O\n", "unknown backbone 'resnet5O'"),
    # a link target: the CLI fills it from the model's arguments and would silently write over this value
    ("data:\n  init_args:\n    serve_features: {weights: none}\n", "data.serve_features is set from the model's"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, extra, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(extra)
    run_dir = tmp_path / "run"
    out = cli("fit", "--config", "configs/quickstart.yaml", "--config", str(bad), f"--trainer.default_root_dir={run_dir}")
    assert out.returncode == 2
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], out.stderr
    assert "Traceback" not in out.stderr
    assert not run_dir.exists()  # no run folder left behind


@pytest.mark.parametrize("flag", ["--data.serve_features={weights: none}", "--data.init_args.backbone=resnet18"])
def test_an_option_the_cli_fills_from_the_model_is_refused_on_the_command_line(tmp_path, capsys, flag):
    line = one_error(capsys, "fit", *QUICK, flag, f"--trainer.default_root_dir={tmp_path / 'run'}")
    assert "cannot be given (the command line (" in line and "remove it there" in line, line
    assert not (tmp_path / "run").exists()
