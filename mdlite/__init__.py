"""mdlite: distil CoT + PoT reasoning from a local teacher into a small local student."""

import os
from pathlib import Path

__version__ = "0.1.0"


class MdliteError(Exception):
    """A user mistake or an environment problem; the message names the file or flag and the fix."""


def mdlite_home() -> Path:
    """mdlite's cache folder: `$MDLITE_HOME`, default `~/.cache/mdlite`."""
    return Path(os.environ.get("MDLITE_HOME") or Path.home() / ".cache" / "mdlite")


def check_output_dir(path: str | Path, flag: str) -> Path:
    """`path` as a writable folder, created when missing; MdliteError naming `flag` when it cannot be."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise MdliteError(f"{folder}: is a file, not a folder; give another {flag}") from None
    except OSError as error:
        raise MdliteError(f"{folder}: cannot create this folder ({error.strerror}); give another {flag}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MdliteError(f"{folder}: folder is not writable; give another {flag}")
    return folder


def release_gpu_memory() -> None:
    """Return torch's cached CUDA memory to the driver (after collecting garbage), so that llama.cpp or the next
    stage can use it; nothing when torch was never imported or CUDA never initialised in this process."""
    import gc
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return
    gc.collect()
    torch.cuda.empty_cache()
