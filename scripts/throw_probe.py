"""Why do C++ exceptions from our extension crash the process on the GPU machine (notes/kernels.md)?

Builds tiny extensions that throw through TORCH_CHECK (as torch builds extensions; with libstdc++/libgcc
linked statically; with a CUDA source linked in, as ours has), calls each in a child process, and prints which
libstdc++ / libgcc_s the process has mapped after loading the GLQ extension, so one run tells a
toolchain mismatch from a fault in our build.

    python3 scripts/throw_probe.py
"""

import os
import subprocess
import sys
import tempfile

SRC = r"""
#include <torch/extension.h>
int64_t boom(int64_t v) { TORCH_CHECK(v < 0, "boom: expected a negative value, got ", v); return v; }
"""

# With a CUDA source beside it the extension is linked as ours is (nvcc objects, cudart).
CU = r"""
__global__ void nop() {}
void launch_nop() { nop<<<1, 1>>>(); }
"""

CHILD = r"""
import sys, torch
from torch.utils.cpp_extension import load_inline
cuda = sys.argv[5] == "cuda"
m = load_inline(name=sys.argv[1], cpp_sources=[sys.argv[2]], cuda_sources=[sys.argv[6]] if cuda else None,
                functions=["boom"], build_directory=sys.argv[3], with_cuda=cuda,
                extra_ldflags=sys.argv[4].split() if sys.argv[4] else None,
                extra_cflags=sys.argv[7].split() if sys.argv[7] else None, verbose=False)
try:
    m.boom(3)
except RuntimeError as e:
    print("raised:", str(e).splitlines()[0], flush=True)
"""


def run_child(name: str, ldflags: str, cuda: bool = False, cflags: str = "") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CHILD, name, SRC, tmp, ldflags,
                            "cuda" if cuda else "cpu", CU, cflags],
                           capture_output=True, text=True, timeout=600)
        print(f"[{name}] ldflags={ldflags!r} cflags={cflags!r} rc={r.returncode} out={r.stdout.strip()!r}")
        if r.returncode:
            print(r.stderr[-600:])


def mapped_runtime_libs() -> None:
    code = ("import torch\nfrom glq.kernels._build import load_extension\nprint(load_extension())\n"
            "libs = sorted({ln.split()[-1] for ln in open('/proc/self/maps')\n"
            "               if 'libstdc++' in ln or 'libgcc_s' in ln})\n"
            "print('\\n'.join(libs))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    print("[glq extension] rc", r.returncode, "\n" + r.stdout + r.stderr[-1500:])


if __name__ == "__main__":
    for cmd in (["g++", "--version"], ["ldd", "--version"]):
        try:
            print(subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0])
        except (OSError, IndexError) as e:
            print(cmd[0], "unavailable:", e)
    import torch

    print("torch", torch.__version__, "cxx11 abi", torch._C._GLIBCXX_USE_CXX11_ABI, "cuda", torch.version.cuda)
    run_child("glq_throw_default", "")
    run_child("glq_throw_static", "-static-libstdc++ -static-libgcc")
    if torch.cuda.is_available():
        run_child("glq_throw_with_cuda", "", cuda=True)
    # suspects on a newer distribution compiler than torch's own: control-flow protection, -O level
    run_child("glq_throw_nocf", "", cflags="-fcf-protection=none")
    run_child("glq_throw_O0", "", cflags="-O0")
    print("\n".join(torch.__config__.show().splitlines()[:6]))
    if os.environ.get("GLQ_PROBE_SKIP_EXT") != "1":
        mapped_runtime_libs()
