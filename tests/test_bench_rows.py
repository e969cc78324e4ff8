"""bench.adaptation's --rows: a full row name picks that row alone, a part of a name picks every row holding it."""
import pytest

from bench.adaptation import rows, selected

NAMES = [r.name for r in rows()]


def pick(*wanted):
    return [n for n in NAMES if selected(n, list(wanted), NAMES)]


def test_full_name_selects_only_that_row():
    assert pick("confusion + soft labels, k=1") == ["confusion + soft labels, k=1"]


def test_part_of_a_name_selects_every_row_holding_it():
    assert pick("DANN") == ["DANN, published network", "DANN, digit_cnn + per-domain BatchNorm"]
    assert pick("k=1") == ["confusion + soft labels, k=1", "confusion + soft labels, k=10"]


def test_no_filter_selects_all():
    assert [n for n in NAMES if selected(n, None, NAMES)] == NAMES


def test_code_version_changes_with_an_uncommitted_edit(tmp_path, monkeypatch):
    """A run measured with other library code is never kept by --resume: an edit under tl_lightning/ changes the
    version, and a run recorded without one is not the same code."""
    import shutil
    import subprocess

    from bench import provenance

    repo = tmp_path / "repo"
    (repo / "tl_lightning").mkdir(parents=True)
    (repo / "tl_lightning" / "a.py").write_text("x = 1\n")
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    monkeypatch.setattr(provenance, "REPO", repo)
    clean = provenance.code_version()
    assert provenance.same_code(clean, provenance.code_version())
    (repo / "tl_lightning" / "a.py").write_text("x = 2\n")
    edited = provenance.code_version()
    assert edited["tl_lightning"].startswith(clean["tl_lightning"] + "+")
    assert not provenance.same_code(clean, edited)
    (repo / "tl_lightning" / "a.py").write_text("x = 1\n")
    (repo / "tl_lightning" / "b.py").write_text("y = 1\n")  # a new, untracked file counts too
    assert not provenance.same_code(clean, provenance.code_version())
    shutil.rmtree(repo / ".git")  # not a checkout: the files' own hash
    assert provenance.code_version()["tl_lightning"].startswith("files:")
    assert not provenance.same_code(None, clean)


@pytest.mark.slow
def test_resume_keeps_a_run_only_under_the_same_code(tmp_path, capsys):
    """bench.adaptation --resume: a finished run with the row's resolved configuration is kept under the same code,
    and run again when its recorded code differs from now's or was never recorded."""
    import argparse
    import json

    import yaml

    from bench import adaptation
    from bench.provenance import code_version

    args = argparse.Namespace(workdir=str(tmp_path), quick=False, threads=1, code=code_version())
    row = rows()[0]
    run_dir = adaptation.run_dir_of(row, 0, args)
    run_dir.mkdir(parents=True)
    resolved = adaptation.resolved_config(adaptation.fit_command(row, 0, run_dir, quick=False))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved))
    (run_dir / "bench_command.json").write_text("[]")
    result = {"seed": 0, "target_acc": 0.5, "code": args.code, "tested": {"selected": "best-00.ckpt"}}
    (run_dir / "bench_result.json").write_text(json.dumps(result))
    assert adaptation.finished(row, 0, args) == result
    (run_dir / "bench_result.json").write_text(json.dumps({**result, "code": {**args.code, "tl_lightning": "x"}}))
    assert adaptation.finished(row, 0, args) is None
    assert "measured with other code" in capsys.readouterr().out
    (run_dir / "bench_result.json").write_text(json.dumps({k: v for k, v in result.items() if k != "code"}))
    assert adaptation.finished(row, 0, args) is None
