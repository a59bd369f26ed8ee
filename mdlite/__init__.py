"""mdlite: distil CoT + PoT reasoning from a local teacher into a small local student."""

import os
from pathlib import Path

__version__ = "0.1.0"


class MdliteError(Exception):
    """A user mistake or an environment problem; the message names the file or flag and the fix."""


def mdlite_home() -> Path:
    """mdlite's cache folder: `$MDLITE_HOME`, default `~/.cache/mdlite`."""
    return Path(os.environ.get("MDLITE_HOME") or Path.home() / ".cache" / "mdlite")
