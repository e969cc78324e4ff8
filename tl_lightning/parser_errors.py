"""One sentence for a command line or config file the parser rejects.

jsonargparse nests the real cause of a rejected ``--model.KEY=VALUE`` several levels deep ("Does not validate
against any of the Union subtypes ... Errors: ... Parser key "lr": Expected a float. Got value: fast"), and a YAML
syntax error names ``<unicode string>`` instead of the file. These helpers dig out the cause and name the option
or the file and line.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import re
import typing
from typing import Literal, Optional, Sequence, Union

import yaml

_CLASS = re.compile(r"Problem with given class_path '([\w.]+)'")
_TOP_KEY = re.compile(r'^Parser key "([\w.]+)"')
_INNER_KEY = re.compile(r'Parser key "([\w.]+)":\s*\n\s*(.+)')
_UNKNOWN = re.compile(r"(?:Option|Key) '([\w.]+)' is not accepted")
_EXPECTED = re.compile(r"Expected a <class '(\w+)'>\. Got value: (.+)")
_HELP = "(run with --help to list the options)"


def config_paths(argv: Sequence[str]) -> list[str]:
    paths, take = [], False
    for arg in argv:
        if take:
            paths.append(arg)
            take = False
        elif arg == "--config":
            take = True
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def yaml_problem(argv: Sequence[str]) -> Optional[str]:
    """The first ``--config`` file that is not valid YAML, with the line and column of the problem."""
    for path in config_paths(argv):
        try:
            with open(path) as f:
                yaml.safe_load(f)
        except OSError:
            continue
        except yaml.YAMLError as e:
            return yaml_sentence(path, e)
    return None


def yaml_sentence(path: str, err: "yaml.YAMLError") -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"'{path}' is not valid YAML: {problem}{where}; fix the file there."


def _parameters(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names = []
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            names += [p for p in inspect.signature(init).parameters if p not in ("self", "args", "kwargs")]
        except (TypeError, ValueError):
            continue
    return sorted(set(names))


def _annotation(class_path: str, key: str):
    """The type hint of ``class_path``'s ``__init__`` parameter ``key`` (None where it can't be read)."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None
    for klass in inspect.getmro(cls):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # an unresolvable hint: no list of values, the generic sentence stays
            continue
        if key in hints:
            return hints[key]
    return None


def accepted_values(annotation) -> Optional[list[str]]:
    """The values a ``bool``/``Literal``/``None`` union accepts, as written on a command line; None for others."""
    values: list[str] = []
    todo = [annotation]
    while todo:
        hint = todo.pop(0)
        origin = typing.get_origin(hint)
        if origin is Union:
            todo[:0] = list(typing.get_args(hint))
        elif origin is Literal:
            values += [str(v) for v in typing.get_args(hint)]
        elif hint is bool:
            values += ["true", "false"]
        elif hint is type(None):
            values.append("null")
        else:
            return None
    return values or None


def _given(argv: Sequence[str], key: str) -> Optional[str]:
    """The value given for ``key`` on the command line (``--group[.init_args].key=value``), if any."""
    for arg in reversed(list(argv)):
        name, sep, value = arg.partition("=")
        if sep and arg.startswith("--") and name.rsplit(".", 1)[-1] == key:
            return value
    return None


def explain(message: str, argv: Sequence[str]) -> str:
    """One sentence for a parser error ``message`` (the command line ``argv`` helps name the option or file)."""
    text = str(message).strip()
    if "Problems parsing config" in text or "<unicode string>" in text:
        found = yaml_problem(argv)
        if found:
            return found
    top = _TOP_KEY.match(text)
    group = top.group(1) if top else ""
    cls = _CLASS.search(text)
    owner = cls.group(1).rpartition(".")[2] if cls else group
    unknown = _UNKNOWN.search(text)
    if unknown:
        key = unknown.group(1)
        close = difflib.get_close_matches(key, _parameters(cls.group(1)) if cls else [], n=1)
        hint = f"did you mean --{group}.{close[0]}?" if close else f"check the spelling {_HELP}"
        return f"--{group}.{key} is not an option of {owner}; {hint}"
    inner = _INNER_KEY.search(text[top.end():] if top else text)
    choices = accepted_values(_annotation(cls.group(1), inner.group(1))) if inner and cls else None
    if choices:
        key, value = inner.group(1), _given(argv, inner.group(1))
        given = f"--{group}.{key}={value}" if value is not None else f"{group}.{key}"
        return f"{given} is not accepted by {owner}'s {key}; give one of: {', '.join(choices)}."
    expected = _EXPECTED.search(text)
    if inner and expected:
        key = inner.group(1)
        return (f"--{group}.{key}={expected.group(2).strip()} is not a valid {expected.group(1)} for {owner}'s "
                f"{key}; give a value of type {expected.group(1)} {_HELP}.")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    keep = [ln for ln in lines if not ln.startswith(("Subtypes:", "Given value type:", "- Expected a <class 'NoneType'>",
                                                   "Errors:", "Does not validate against any of the Union"))]
    return " ".join(keep[:4]) + f" {_HELP}"
