"""Reading and writing configurations: TOML files, --set overrides, one-line errors, the reference."""

from __future__ import annotations

import inspect
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ValidationError

from privet.common.config.rules import PrivetConfig
from privet.common.errors import ConfigError

__all__ = [
    "apply_overrides",
    "config_reference",
    "dump_config",
    "format_validation_error",
    "load_config",
]


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc if not str(p).startswith("function-after"))


def format_validation_error(exc: ValidationError) -> str:
    """Turn a pydantic error into one readable line per problem, each naming the field.

    Parameters
    ----------
    exc
        The error pydantic raised.

    Returns
    -------
    str
        Lines of the form ``field: what is wrong (got VALUE)``.

    """
    lines = []
    for err in exc.errors():
        where = _loc(err["loc"]) or "config"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown field (check the spelling; `privet config-reference` lists every field)"
        elif kind == "literal_error":
            msg = msg.replace("Input should be", "must be one of")
        got = err.get("input")
        shown = (
            "" if kind in ("missing", "model_type") or isinstance(got, dict) else f" (got {got!r})"
        )
        # A model-level check already names its field ("data.train_files must ..."): printing
        # the section in front of it again would read "data: data.train_files ...".
        named = where != "config" and msg.startswith((f"{where}.", f"{where} ", f"{where}:"))
        lines.append(f"{msg}{shown}" if named else f"{where}: {msg}{shown}")
    return "\n".join(lines)


def _parse_value(raw: str) -> Any:
    """Parse an override value as a TOML value; bare words are strings."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        if raw.lower() in ("none", "null"):
            return None
        return raw


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw config dictionary.

    Values are read as TOML (``3e-4``, ``true``, ``["query", "value"]``); ``none`` unsets a field.

    Parameters
    ----------
    data
        The raw configuration, as read from TOML (changed in place and returned).
    overrides
        Items of the form ``section.key=value``.

    Returns
    -------
    dict
        ``data`` with the overrides applied.

    Raises
    ------
    ConfigError
        When an override is not of the form ``section.key=value``.

    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"--set {item!r} is not of the form section.key=value",
                fix="e.g. --set train.lr=3e-4",
            )
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[leaf] = _parse_value(raw.strip())
    return data


def _drop_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _drop_none(v) for k, v in data.items() if v is not None}
    if isinstance(data, list):
        return [_drop_none(v) for v in data]
    return data


def load_config(path: Path | str | None = None, overrides: list[str] | None = None) -> PrivetConfig:
    """Load and validate a configuration from an optional TOML file plus overrides.

    Parameters
    ----------
    path
        A TOML file with sections ``[model]``, ``[adapter]``, ``[privacy]``, ``[train]``, ``[data]``,
        ``[federation]``, ``[simulation]``; ``None`` starts from the defaults.
    overrides
        ``section.key=value`` items applied after the file.

    Returns
    -------
    PrivetConfig
        The validated configuration.

    Raises
    ------
    ConfigError
        With one line per problem, each naming the field.

    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file {str(p)!r} does not exist", fix="pass --config with a TOML file"
            )
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
    apply_overrides(data, overrides or [])
    try:
        return PrivetConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def dump_config(config: PrivetConfig) -> str:
    """Render a configuration as TOML that :func:`load_config` reads back to an equal object.

    Fields that are ``None`` are left out (TOML has no null) when ``None`` is their default, and
    written as ``"none"`` otherwise (read back as ``None``).
    """
    data = _none_words(config, config.model_dump(mode="json"))
    return tomli_w.dumps(_drop_none(data))


def _none_words(model: BaseModel, data: dict[str, Any]) -> dict[str, Any]:
    """Write ``"none"`` for fields that are None where the default is not (else they would revert)."""
    for name, f in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            data[name] = _none_words(value, data[name])
        elif value is None and f.get_default(call_default_factory=True) is not None:
            data[name] = "none"
    return data


def config_reference() -> str:
    """Markdown reference of every section and field with its default and help text."""
    out = ["# privet configuration reference", ""]
    sections: list[tuple[str, BaseModel]] = []
    for section, field in PrivetConfig.model_fields.items():
        model = field.default_factory() if field.default_factory else None  # type: ignore[call-arg]
        assert isinstance(model, BaseModel)
        sections.append((section, model))
    while sections:
        section, model = sections.pop(0)
        out.append(f"## [{section}]")
        out.append("")
        out.append(inspect.cleandoc(type(model).__doc__ or ""))
        out.append("")
        out.append("| field | default | meaning |")
        out.append("| --- | --- | --- |")
        nested: list[tuple[str, BaseModel]] = []
        for name, f in type(model).model_fields.items():
            default = getattr(model, name)
            if isinstance(default, BaseModel):
                # A sub-section (e.g. [privacy.client_level]) gets its own table after this one.
                nested.append((f"{section}.{name}", default))
                out.append(f"| `{name}` | see [{section}.{name}] | {f.description or ''} |")
                continue
            shown = (
                "none"
                if default is None
                else repr(default if not isinstance(default, Path) else str(default))
            )
            out.append(f"| `{name}` | `{shown}` | {f.description or ''} |")
        out.append("")
        sections[:0] = nested
    return "\n".join(out)
