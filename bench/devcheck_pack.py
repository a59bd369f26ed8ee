"""What `bash bench/device_check.sh prepare` packs for a GPU machine without network, small enough to travel
(the working tree and the carried `.devcheck/` together must stay under 64 MiB).

    python bench/devcheck_pack.py bnb .devcheck/whl/bitsandbytes-0.50.2-*.whl       # in place
    python bench/devcheck_pack.py llama llama_cpp_python-0.3.36.tar.gz .devcheck/llama-cpp-python-0.3.36-cuda-src.tar.gz

`bnb`: the bitsandbytes wheel (43 MB) keeps only the native libraries for CUDA 13.x and the CPU (the GPU image's
torch is built for CUDA 13.0; bitsandbytes loads the library named after `torch.version.cuda`); RECORD is
rewritten with the kept files' hashes, so pip installs it as usual. `--keep-cuda 128,130` keeps other versions.

`llama`: the llama-cpp-python sdist (77 MB) keeps what `pip install` with `CMAKE_ARGS="-DGGML_CUDA=on
-DLLAVA_BUILD=OFF"` needs to build the library, and what mdlite's export needs to convert (the converter, its
`conversion/` and `gguf-py/`), in the sdist's own layout (mdlite.export reads the vendored llama.cpp commit from
`.git/modules/vendor/llama.cpp/HEAD`): the Python package, the top-level build files, and vendor/llama.cpp
without its test models, docs, media, benches, tests, examples, tools (mtmd is off) and the ggml backends other
than the CPU and CUDA ones. Written as .tar.xz (smaller than gzip for source).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import re
import sys
import tarfile
import zipfile
from pathlib import Path

# vendor/llama.cpp's top-level folders a CUDA build of the library (and the converter) does not read
LLAMA_DROP_DIRS = {"models", "docs", "media", "benches", "tests", "examples", "tools", "pocs", ".github", ".devops",
                   "skills", "ci", "app", "scripts", "requirements", "licenses", "grammars"}
LLAMA_KEEP_BACKENDS = {"ggml-cpu", "ggml-cuda"}
TOP_FILES = {"CMakeLists.txt", "pyproject.toml", "PKG-INFO", "README.md", "LICENSE.md"}
COMMIT_FILE = ".git/modules/vendor/llama.cpp/HEAD"


def keep_llama_member(rest: str) -> bool:
    """Whether a path inside the sdist's root folder goes into the trimmed source."""
    if rest in TOP_FILES or rest == COMMIT_FILE or rest.startswith("llama_cpp/"):
        return True
    if not rest.startswith("vendor/llama.cpp/"):
        return False
    parts = rest.removeprefix("vendor/llama.cpp/").split("/")
    if len(parts) > 1 and parts[0] in LLAMA_DROP_DIRS:
        return False
    if parts[:2] == ["ggml", "src"] and len(parts) > 3 and parts[2].startswith("ggml-") \
            and parts[2] not in LLAMA_KEEP_BACKENDS:
        return False
    return True


def trim_llama(sdist: Path, out: Path) -> tuple[int, int]:
    """Write the trimmed source of `sdist` to `out`; (files kept, files dropped)."""
    kept = dropped = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with tarfile.open(sdist) as source, tarfile.open(partial, "w:xz") as target:
        for member in source:
            _, _, rest = member.name.partition("/")
            if not (member.isfile() or member.isdir()) or not keep_llama_member(rest) and not member.isdir():
                dropped += member.isfile()
                continue
            if member.isdir():
                continue  # folders come with their files
            target.addfile(member, source.extractfile(member))
            kept += 1
    partial.rename(out)
    return kept, dropped


def trim_bitsandbytes(wheel: Path, keep_cuda: list[str]) -> list[str]:
    """Drop the native libraries of other CUDA versions, ROCm and XPU from `wheel` (in place); the kept ones."""
    wanted = re.compile(r"bitsandbytes/libbitsandbytes_(cpu|" + "|".join(f"cuda{v}" for v in keep_cuda) + r")\.so$")
    buffer, records, kept, record_name = io.BytesIO(), [], [], None
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            if info.filename.endswith(".dist-info/RECORD"):
                record_name = info.filename
                continue
            if re.fullmatch(r"bitsandbytes/libbitsandbytes_\w+\.so", info.filename):
                if not wanted.fullmatch(info.filename):
                    continue
                kept.append(info.filename)
            data = source.read(info.filename)
            target.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{info.filename},sha256={digest},{len(data)}")
        if record_name is None:
            raise SystemExit(f"{wheel}: no RECORD; not a wheel")
        target.writestr(record_name, "\n".join([*records, f"{record_name},,"]) + "\n")
    if not any("cuda" in name for name in kept):
        raise SystemExit(f"{wheel}: no libbitsandbytes_cuda{{{','.join(keep_cuda)}}}.so in it; --keep-cuda another")
    wheel.write_bytes(buffer.getvalue())
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    bnb = sub.add_parser("bnb", help="trim a bitsandbytes wheel in place")
    bnb.add_argument("wheel", type=Path)
    bnb.add_argument("--keep-cuda", default="130,131,132", help="CUDA versions whose libraries stay (e.g. 128,130)")
    llama = sub.add_parser("llama", help="the trimmed llama-cpp-python source")
    llama.add_argument("sdist", type=Path)
    llama.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.what == "bnb":
        before = args.wheel.stat().st_size
        kept = trim_bitsandbytes(args.wheel, [v.strip() for v in args.keep_cuda.split(",") if v.strip()])
        print(f"{args.wheel.name}: {before / 2**20:.1f} -> {args.wheel.stat().st_size / 2**20:.1f} MiB; native "
              f"libraries kept: {', '.join(Path(k).name for k in kept)}")
    else:
        kept, dropped = trim_llama(args.sdist, args.out)
        print(f"{args.out.name}: {kept} files kept, {dropped} dropped; {args.sdist.stat().st_size / 2**20:.1f} -> "
              f"{args.out.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    sys.exit(main())
