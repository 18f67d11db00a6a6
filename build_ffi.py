"""
Compiles ternary_cpu.c, ternary_x86.c, layers_cpu.c and decode_cpu.c (four units sharing ternary.h,
whose first part is also the declarations handed to cffi) into the Python extension module
_ternary_cpu with cffi (out-of-line API mode: a real C extension, and cffi releases the GIL around
every call into it).

    python build_ffi.py        # builds ./_ternary_cpu*.so, prints the flags and the SIMD path

ckernels.py runs the same build on first use when the module is missing, damaged (its digest in
_ternary_cpu.sha256 does not match) or older than ternary_cpu.c, so this step is optional. Needs a C compiler (gcc or clang); OpenMP is used when
the compiler supports -fopenmp, otherwise the kernels run on one thread (said loudly;
BITDISTILL_NO_OPENMP=1 python build_ffi.py builds that way on purpose).
No -march=native: the SIMD path (plain C / AVX2 / AVX-512 VNNI) is picked at run time.
"""
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE = "_ternary_cpu"
SOURCES = [os.path.join(HERE, f) for f in ("ternary_cpu.c", "ternary_x86.c", "layers_cpu.c", "decode_cpu.c")]
PATH_NAMES = {0: "plain C", 1: "AVX2", 2: "AVX-512 VNNI"}
HEADER = os.path.join(HERE, "ternary.h")
INCLUDED = [HEADER]   # #included by every source: a change rebuilds too
API_END = "end of the Python API"   # ternary.h: the structs and entry points above this line are cffi's cdef


def cdef():
    """The declarations Python may call: ternary.h up to its API_END line, without the preprocessor
    lines (cffi parses C declarations, not directives). The layout is written once, in the header."""
    with open(HEADER) as f:
        text = f.read()
    api = text[:text.rindex(API_END)].rsplit("\n", 1)[0]         # up to the line that says it
    return "\n".join(l for l in api.splitlines() if not l.lstrip().startswith("#"))


BASE_FLAGS = ["-O3", "-std=gnu11", "-ffp-contract=off"]  # no FMA contraction: exact fp32 scales


class BuildError(RuntimeError):
    """The C kernels cannot be compiled here (no compiler, or the compiler failed)."""


def find_compiler():
    cc = os.environ.get("CC", "cc")
    path = shutil.which(cc.split()[0]) or shutil.which("gcc") or shutil.which("clang")
    if path is None:
        raise BuildError(
            "no C compiler found (tried $CC, cc, gcc, clang). The packed ternary kernels are C: "
            "install one (Debian/Ubuntu: `apt-get install build-essential`; macOS: "
            "`xcode-select --install`), then run `python build_ffi.py`.")
    return path


def openmp_works(cc):
    """True if `cc -fopenmp` compiles and links a tiny OpenMP program."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n")
        r = subprocess.run([cc, "-fopenmp", src, "-o", os.path.join(d, "t")], capture_output=True)
        return r.returncode == 0


def build(verbose=True):
    """Compile ternary_cpu.c -> HERE/_ternary_cpu*.so. Returns the path of the built module."""
    from cffi import FFI
    cc = find_compiler()
    omp = openmp_works(cc) and not os.environ.get("BITDISTILL_NO_OPENMP")  # the env var: try the fallback
    cflags = BASE_FLAGS + (["-fopenmp"] if omp else ["-Wno-unknown-pragmas"])
    ldflags = ["-fopenmp"] if omp else []
    if verbose:
        print(f"build_ffi: compiler {cc}, flags {' '.join(cflags)}, link {' '.join(ldflags) or '-'}")
        if not omp:
            print("build_ffi: WARNING: building without OpenMP (-fopenmp failed, or BITDISTILL_NO_OPENMP is set); "
                  "the kernels will run on ONE thread.")
    ffi = FFI()
    ffi.cdef(cdef())
    # the generated wrapper includes the header; the four sources are compiled beside it and linked in
    ffi.set_source(MODULE, '#include "ternary.h"\n', sources=SOURCES,
                   include_dirs=[HERE], libraries=["m"],
                   extra_compile_args=cflags, extra_link_args=ldflags)
    tmp = os.path.join(HERE, "build")
    os.makedirs(tmp, exist_ok=True)
    try:
        built = ffi.compile(tmpdir=tmp, verbose=False)
    except Exception as e:   # distutils' CompileError / LinkError, cffi's VerificationError
        raise BuildError(f"compiling ternary_cpu.c with {cc} failed ({type(e).__name__}: {str(e)[:300]}); "
                         "run `python build_ffi.py` to see the compiler's messages") from None
    # move into place atomically (another process may be importing the old one), then record its
    # digest: a damaged module (a truncated copy) is rebuilt instead of crashing the import (SIGBUS)
    dst = os.path.join(HERE, os.path.basename(built))
    os.replace(built, dst)
    with open(DIGEST + ".tmp", "w") as f:
        f.write(f"{digest(dst)}  {os.path.basename(dst)}\n")
    os.replace(DIGEST + ".tmp", DIGEST)
    if verbose:
        print(f"build_ffi: built {dst}")
    return dst


DIGEST = os.path.join(HERE, MODULE + ".sha256")   # written by build(): "<sha256>  <module file name>"


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def module_state():
    """"missing" (never built), "damaged" (not the file build() wrote, e.g. truncated), "stale"
    (ternary_cpu.c or this file is newer than it) or "ok"."""
    built = glob.glob(os.path.join(HERE, MODULE + "*.so")) + glob.glob(os.path.join(HERE, MODULE + "*.pyd"))
    if not built:
        return "missing"
    try:
        with open(DIGEST) as f:
            want, name = f.read().split()
    except (OSError, ValueError):
        return "damaged"
    path = os.path.join(HERE, name)
    if path not in built or digest(path) != want:
        return "damaged"
    newest = max(os.path.getmtime(f) for f in SOURCES + INCLUDED + [__file__])
    return "stale" if newest > os.path.getmtime(path) else "ok"


def describe(lib):
    """One line: the SIMD path chosen at run time, OpenMP and threads."""
    p = lib.tl_cpu_path()
    omp = "OpenMP" if lib.tl_has_openmp() else "no OpenMP"
    return f"SIMD path: {PATH_NAMES[p]} (path {p}); {omp}, {lib.tl_max_threads()} threads"


if __name__ == "__main__":
    import argparse
    argparse.ArgumentParser(description="Compile ternary_cpu.c into the _ternary_cpu module with cffi "
                            "(API mode); print the flags and the SIMD path. Env: CC, BITDISTILL_NO_OPENMP=1.").parse_args()
    try:
        build()
    except BuildError as e:
        sys.exit(f"build_ffi.py: error: {e}")
    sys.path.insert(0, HERE)
    import importlib
    lib = importlib.import_module(MODULE).lib
    print(f"build_ffi: {describe(lib)}")
