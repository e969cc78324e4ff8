"""DataModule options that the CLI fills from the model's (``link_arguments``); a value given for one is refused.

jsonargparse computes a link's target from its source after parsing and writes over whatever the command line or a
config file gave, so a hand-written ``--data.serve_features`` or ``data: init_args: backbone:`` would be dropped
without a word. ``refuse_given`` names the option and where its value comes from instead.
"""
from __future__ import annotations

import os
from typing import Iterator

import yaml

from tl_lightning.errors import TLError

#: link target under ``data`` (or ``data.init_args``) -> what the CLI fills it from
LINKED = {
    "backbone": "--model.init_args.backbone",
    "serve_features": "the model's arguments (the features its method reads)",
}


def _flag_keys(argv: list[str]) -> Iterator[tuple[str, str]]:
    for token in argv:
        for name in LINKED:
            if token.split("=", 1)[0] in (f"--data.{name}", f"--data.init_args.{name}"):
                yield name, f"the command line ({token.split('=', 1)[0]})"


def _files(argv: list[str], flag: str) -> Iterator[str]:
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            yield argv[i + 1]
        elif token.startswith(flag + "="):
            yield token.split("=", 1)[1]


def _section_keys(section, where: str) -> Iterator[tuple[str, str]]:
    if not isinstance(section, dict):
        return
    init_args = section.get("init_args")
    for name in LINKED:
        if name in section or (isinstance(init_args, dict) and name in init_args):
            yield name, where


def _yaml(path: str):
    if not os.path.isfile(path):
        return None  # the parser reports a missing file, or this is an inline value
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return None  # the parser reports a file it cannot read


def given_link_targets(argv: list[str]) -> list[tuple[str, str]]:
    """(option, where it was given) for every link target set on the command line or in a config file."""
    found = list(_flag_keys(argv))
    for path in _files(argv, "--config"):
        doc = _yaml(path)
        if isinstance(doc, dict):
            found += _section_keys(doc.get("data"), f"config file {path}")
    for path in _files(argv, "--data"):
        found += _section_keys(_yaml(path), f"data file {path}")
    return found


def refuse_given(argv: list[str]) -> None:
    """One sentence if the command sets an option that the CLI fills from the model's arguments."""
    given = given_link_targets([str(a) for a in argv])
    if given:
        name, where = given[0]
        raise TLError(f"data.{name} is set from {LINKED[name]} and cannot be given ({where} sets it); "
                      f"remove it there")
