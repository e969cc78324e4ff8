"""bench.adaptation's --rows: a full row name picks that row alone, a part of a name picks every row holding it."""
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
