"""``--ckpt_path`` checks: the checkpoint exists and loads, it holds the config's method, and no model flag typed
on the command line is silently replaced by the checkpoint's hyperparameters.

LightningCLI merges a checkpoint's hyperparameters (including its method class) over the parsed config. Here a
checkpoint of another method class stops the command; a typed ``--model.KEY=VALUE`` that the checkpoint would
override is applied for ``validate``/``test``/``predict`` (said in one line) and refused for ``fit``, where the
resumed weights and optimizer state belong to the checkpoint's values.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Optional, Sequence

import torch

from tl_lightning.errors import TLError

_MISSING = object()


def read_hyperparameters(path: str) -> dict:
    """The checkpoint's ``hyper_parameters`` (one sentence when the file is missing or unreadable)."""
    if not os.path.exists(path):
        raise TLError(f"checkpoint '{path}' does not exist; pass an existing .ckpt file to --ckpt_path "
                      "(or --ckpt_path last for the newest run's last checkpoint).")
    if os.path.isdir(path):
        raise TLError(f"--ckpt_path '{path}' is a folder; pass a .ckpt file inside it (e.g. checkpoints/last.ckpt).")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TLError(f"checkpoint '{path}' cannot be read ({reason[:120]}); it is truncated or not a Lightning "
                      "checkpoint, so pass another --ckpt_path (e.g. the run's best-*.ckpt).") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise TLError(f"'{path}' is not a Lightning checkpoint (no state_dict); pass a .ckpt file written by fit.")
    return dict(ckpt.get("hyper_parameters") or {})


def resolve_class(class_path: str) -> Any:
    """The class a ``class_path`` names, or the string itself when it names none."""
    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return class_path


def check_method_class(path: str, hparams: dict, config_class_path: Optional[str]) -> None:
    """Stop when the checkpoint was written by another method class than the config's."""
    saved = hparams.get("_class_path")
    if not saved or not config_class_path:
        return
    if resolve_class(saved) is resolve_class(config_class_path) or saved == config_class_path:
        return
    short = lambda p: str(p).rpartition(".")[2]  # noqa: E731
    raise TLError(f"checkpoint '{path}' holds a {short(saved)} model but the config trains {short(config_class_path)}; "
                  f"pass a checkpoint of a {short(config_class_path)} run, or the config of the checkpoint's method.")


def typed_model_keys(argv: Sequence[str]) -> list[str]:
    """Dotted keys below ``model`` given on the command line (``--model.lr=0.5`` -> ``lr``)."""
    keys = []
    for arg in argv:
        arg = str(arg)
        if not arg.startswith("--model."):
            continue
        key = arg[len("--model."):].split("=", 1)[0]
        parts = [p for p in key.split(".") if p not in ("init_args", "dict_kwargs")]
        if parts and parts[0] != "class_path":
            keys.append(".".join(parts))
    return keys


def _node(value: Any, part: str) -> Any:
    for container in (value, _child(value, "init_args"), _child(value, "dict_kwargs")):
        found = _child(container, part)
        if found is not _MISSING:
            return found
    return _MISSING


def _child(value: Any, part: str) -> Any:
    if value is _MISSING or value is None:
        return _MISSING
    try:
        return value[part] if part in value else _MISSING
    except TypeError:
        return _MISSING


def model_value(model_config: Any, key: str) -> Any:
    """The value at a dotted key of the model's config (``init_args`` levels skipped); ``_MISSING`` if absent."""
    node = model_config
    for part in key.split("."):
        node = _node(node, part)
        if node is _MISSING:
            break
    return node


def _set_value(model_config: Any, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = model_config
    for part in parents:
        node = _node(node, part)
    for container in (_child(node, "init_args"), _child(node, "dict_kwargs"), node):
        if _child(container, last) is not _MISSING:
            container[last] = value
            return


def typed_values(model_config: Any, argv: Sequence[str]) -> dict:
    """The typed model flags' values as parsed from the command line (before the checkpoint is merged)."""
    return {k: model_value(model_config, k) for k in typed_model_keys(argv)}


def reconcile_typed_flags(command: str, ckpt_path: str, model_config: Any, typed: dict) -> list[str]:
    """Compare each typed flag with the config after the checkpoint's merge: refuse (fit) or re-apply (others).

    Returns one note per flag re-applied.
    """
    notes = []
    for key, wanted in typed.items():
        now = model_value(model_config, key)
        if wanted is _MISSING or now == wanted:
            continue
        if command == "fit":
            raise TLError(f"--model.{key}={wanted} differs from the checkpoint's {key}={now} ('{ckpt_path}'); a "
                          "resumed fit continues with the checkpoint's hyperparameters, so drop the flag or start "
                          "a new run without --ckpt_path.")
        _set_value(model_config, key, wanted)
        notes.append(f"using --model.{key}={wanted} from the command line instead of the checkpoint's {key}={now}")
    return notes
