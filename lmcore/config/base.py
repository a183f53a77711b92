"""What every params section is: a pydantic model that refuses unknown keys, and the error a bad params file is."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from lmcore.errors import InputError


class ParamsError(InputError):
    """A params file or override that does not validate; the message names the file and key."""


class Section(BaseModel):
    # extra="forbid": a mistyped key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
