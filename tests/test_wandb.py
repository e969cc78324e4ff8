"""W&B: the logger goes offline by itself without a key or a server, and an offline run directory holds the
metrics and the plots the run logged (read back from W&B's own run file)."""
from __future__ import annotations

import json
import socket
import struct
import threading
from pathlib import Path

import pytest

from fault_helpers import cli
from helpers import read_metrics
from tl_lightning.loggers import WandbLogger, has_api_key, server_reachable, wandb_mode

_BLOCK = 32768  # W&B's run file is a LevelDB-style log: 32 KiB blocks of (crc32, length, type) records


def wandb_records(path: Path):
    """Decode every record of an offline run's ``run-<id>.wandb`` file with W&B's protobuf schema."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending + chunk)
            pending = b""
            yield record
        else:  # first or middle piece
            pending += chunk


def _history(records) -> list[dict]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
    return rows


@pytest.fixture
def no_wandb_credentials(monkeypatch, tmp_path):
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    return netrc


def _listening_server():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    threading.Thread(target=lambda: server.accept(), daemon=True).start()
    return server


def test_mode_is_offline_without_an_api_key(no_wandb_credentials):
    assert not has_api_key()
    mode, reason = wandb_mode()
    assert mode == "offline" and "API key" in reason


def test_mode_is_offline_when_the_server_is_unreachable(no_wandb_credentials, monkeypatch):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens on this port any more
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    assert not server_reachable(timeout=1)
    mode, reason = wandb_mode()
    assert mode == "offline" and "unreachable" in reason


def test_mode_is_online_with_a_key_in_netrc_and_a_server(no_wandb_credentials, monkeypatch):
    server = _listening_server()
    host, port = server.getsockname()
    no_wandb_credentials.write_text(f"machine {host}\n  login user\n  password {'k' * 40}\n")
    monkeypatch.setenv("WANDB_BASE_URL", f"http://{host}:{port}")
    assert has_api_key() and server_reachable(timeout=2)
    assert wandb_mode() == ("online", "API key and server found")
    monkeypatch.setenv("WANDB_MODE", "offline")  # an explicit mode always wins
    assert wandb_mode()[0] == "offline"
    server.close()


def test_logger_goes_offline_and_drops_log_model(no_wandb_credentials, tmp_path):
    logger = WandbLogger(project="p", tags=["a"], log_model=True, save_dir=str(tmp_path))
    assert logger._offline is True and logger._log_model is False
    assert logger._wandb_init["project"] == "p" and logger._wandb_init["tags"] == ["a"]
    assert logger._wandb_init["dir"] == str(tmp_path)


@pytest.mark.slow
def test_offline_run_directory_holds_the_logged_metrics_and_plots(tmp_path):
    run_dir = tmp_path / "run"
    proc = cli("fit", "--config", "configs/quickstart.yaml", "--config", "configs/logger/wandb.yaml",
               "--trainer.logger.init_args.tags=[test,offline]", "--data.image_size=32", "--trainer.max_epochs=2",
               "--data.num_workers=0", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
               f"--trainer.default_root_dir={run_dir}", env={"NETRC": str(tmp_path / "no-netrc")},
               unset=("WANDB_MODE", "WANDB_API_KEY"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B: logging offline (no W&B API key" in proc.stdout + proc.stderr

    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # in the run directory (save_dir defaults to it), offline
    records = list(wandb_records(next(runs[0].glob("run-*.wandb"))))
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_record.project == "tl_lightning" and run_record.display_name == "run"
    assert list(run_record.tags) == ["test", "offline"]

    history = _history(records)
    metrics = read_metrics(run_dir)
    logged_val = [row["val/acc"] for row in history if "val/acc" in row]
    written_val = [row["val/acc"] for row in metrics["history"]]
    assert logged_val == pytest.approx(written_val) and len(logged_val) == 2
    logged_test = [row["test/acc"] for row in history if "test/acc" in row]
    assert logged_test == pytest.approx([metrics["metrics"]["test/acc"]])

    # plots as media: the learning curves and the test confusion matrix, stored with the run
    media = {key.split("/")[1]: row for row in history for key in row if key.startswith("media/")}
    assert {"learning_curves", "confusion_matrix"} <= set(media)
    for name in ("learning_curves", "confusion_matrix"):
        files = list((runs[0] / "files" / "media" / "images" / "media").glob(f"{name}_*.png"))
        assert len(files) == 1 and files[0].stat().st_size > 1000
    confusion = json.loads((run_dir / "confusion_matrix.json").read_text())
    counts = confusion["matrix"]
    accuracy = sum(counts[i][i] for i in range(len(counts))) / sum(map(sum, counts))
    assert accuracy == pytest.approx(metrics["metrics"]["test/acc"], abs=1e-6)
