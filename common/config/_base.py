"""The base of every section: unknown keys refused, assignments validated, 'none' read as None."""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

DEFAULT_MODEL = "embedded:all-MiniLM-L6-v2"


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored setting.
    # validate_assignment: the Python API validates as strictly as the TOML loader.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @model_validator(mode="before")
    @classmethod
    def _none_word(cls, data: Any) -> Any:
        # TOML has no null: a field that may be None is written "none" in a file (dump_config does
        # so when None is not the default), so a saved config reads back to the same object.
        if isinstance(data, dict):
            for name, value in list(data.items()):
                f = cls.model_fields.get(name)
                if (
                    f is not None
                    and isinstance(value, str)
                    and value.lower() == "none"
                    and type(None) in typing.get_args(f.annotation)
                ):
                    data[name] = None
        return data
