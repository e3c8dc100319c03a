"""Build llama.cpp's own `llama-server` once, for the tests that send token-id prompts to a server.

    python tests/build_llama_server.py        # `make llama-server` (and `make test`) run it; a cached build is kept

llama-cpp-python's server reads `prompt` as text only; llama.cpp's C++ server takes a list of token ids, as vLLM
does. Its sources come vendored in the llama-cpp-python source package that `caictl families prepare` reads the
families' vocabularies from, so the server matches the llama.cpp the rest of the suite runs. One static binary
goes to $CAICTL_CACHE/llama-server/<llama-cpp-python version>/llama-server (about 10 to 20 minutes on two
cores, once); LLAMA_SERVER names another binary instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from caictl.models.families import LLAMA_CPP_PYTHON, cache_root

# Portable (no -march=native: the cache may move to another CPU), static (one file to cache), no network code.
CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON"]


def binary_path() -> Path:
    """Where the suite finds llama-server: $LLAMA_SERVER, else the cached build."""
    if os.environ.get("LLAMA_SERVER"):
        return Path(os.environ["LLAMA_SERVER"])
    return cache_root() / "llama-server" / LLAMA_CPP_PYTHON / "llama-server"


def build(out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="caictl-llama-server-") as tmp:
        tmp = Path(tmp)
        print(f"llama-server: downloading the llama-cpp-python {LLAMA_CPP_PYTHON} source package ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--dest", str(tmp)], check=True)
        archive, = tmp.glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(archive, "r:gz") as tar:
            # The "data" filter (no absolute paths, links out or devices) exists from Python 3.11.4 on.
            tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        source, = tmp.glob("llama_cpp_python-*/vendor/llama.cpp")
        start = time.perf_counter()
        print(f"llama-server: building from {source.relative_to(tmp)} (once; 10 to 20 minutes on two cores) ...",
              flush=True)
        subprocess.run(["cmake", "-S", str(source), "-B", str(tmp / "build"), *CMAKE_OPTIONS], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(tmp / "build"), "--target", "llama-server",
                        "-j", str(os.cpu_count() or 2)], check=True, stdout=subprocess.DEVNULL)
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_suffix(".partial")
        shutil.copy2(tmp / "build" / "bin" / "llama-server", partial)
        partial.rename(out)  # last: an interrupted build leaves no binary that looks finished
        print(f"llama-server: built in {time.perf_counter() - start:.0f} s -> {out}", flush=True)


def main() -> None:
    out = binary_path()
    if out.exists():
        print(f"llama-server: ready at {out}", flush=True)
        return
    build(out)


if __name__ == "__main__":
    main()
