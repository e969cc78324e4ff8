"""Objects from ``{class_path, init_args}`` specs, read by jsonargparse, the parser LightningCLI itself uses: the
class path is resolved, checked to be a subclass of the expected base, and ``init_args`` are checked against the
class's signature before anything is built."""
from __future__ import annotations

from typing import Any

from jsonargparse import ArgumentError, ArgumentParser

from tl_lightning.errors import TLError

_NOISE = ("Parser key", "Does not validate", "Subtypes:", "Errors:", "- Expected a <class 'NoneType'>", "Given value")


def _reason(error: ArgumentError) -> str:
    """jsonargparse's explanation without its Union bookkeeping, on one line."""
    lines = [line.strip() for line in str(error).splitlines()]
    kept = [line.lstrip("- ") for line in lines if line and not line.startswith(_NOISE)]
    return " ".join(kept) or lines[0]


def instantiate(spec: dict, base: type, what: str, fix: str) -> Any:
    """``spec`` (``{"class_path": ..., "init_args": {...}}``) built as a subclass of ``base``; a spec that names no
    such class or passes arguments it does not take is one sentence: ``cannot build <what> ...; <fix>``."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, "value", required=True)
    try:
        config = parser.parse_object({"value": spec})
    except ArgumentError as e:
        raise TLError(f"cannot build {what} from {spec.get('class_path')!r} ({_reason(e)}); {fix}") from e
    build = getattr(parser, "instantiate", None) or parser.instantiate_classes  # renamed in jsonargparse 4.49
    return build(config).value
