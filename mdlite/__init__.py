"""mdlite: distil CoT + PoT reasoning from a local teacher into a small local student."""

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
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


def import_peft(*, four_bit: bool = False) -> None:
    """Import peft, which imports bitsandbytes, without the note bitsandbytes logs at its import on CPUs with
    AVX512-BF16 ("Failed to load CPU gemm_4bit_forward ... pip install kernels"): its optional CPU 4-bit kernel
    matters to a 4-bit model only. Call it before anything else imports peft (transformers' set_seed does)."""

    def keep(record: logging.LogRecord) -> bool:
        return four_bit or "gemm_4bit_forward" not in record.getMessage()

    note = logging.getLogger("bitsandbytes.backends.cpu.ops")
    note.addFilter(keep)
    try:
        with contextlib.suppress(ImportError):  # without peft, the stage says what to install
            import peft  # noqa: F401
    finally:
        note.removeFilter(keep)


@contextlib.contextmanager
def peft_quietly() -> Iterator[None]:
    """Run peft without transformers' FutureWarning that peft reads the deprecated `is_gradient_checkpointing`
    (peft's to change, nothing the user can do)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield
