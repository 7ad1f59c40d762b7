"""Build dlm-kernels and its C++ CPU extension ``dlm_kernels._C``.

Install with the torch you already have (CPU or CUDA build); the extension is compiled against it:

    pip install --no-build-isolation .          # or: pip install --no-build-isolation -e .
    pip wheel --no-build-isolation --no-deps .

Environment switches (read at build time):

    DLM_KERNELS_SKIP_EXT=1     build no extension: a pure-Python install. The ops then use the
                               Triton kernels on CUDA tensors and the PyTorch reference on CPU,
                               and warn once that the C++ ops are missing.
    MAX_JOBS=N                 parallel compile jobs for ninja (default: torch's choice, all cores).
    DLM_KERNELS_CPU_ARCH=ARCH  value for gcc's -march (default "native": the build machine's own
                               vector units). Set e.g. "x86-64-v3" when building a wheel for
                               other machines, or "" to pass no -march at all.
    DLM_KERNELS_DEBUG=1        -O0 -g instead of -O3, for gdb and sanitizers.
    DLM_KERNELS_NO_OPENMP=1    build without OpenMP (single-threaded kernels; the vectorisation
                               hints stay, through -fopenmp-simd).

The two defaults that not every compiler takes are tried first on a small program, with the
compile and link flags of the environment (CXX, CPPFLAGS, CXXFLAGS, LDFLAGS): a compiler that
rejects -march=native builds for its default target (the scalar code paths instead of AVX2),
one without OpenMP (Apple clang) builds single-threaded kernels with -fopenmp-simd. Each is a
warning. An explicit DLM_KERNELS_CPU_ARCH is never dropped, and any other build error fails the
install (DLM_KERNELS_SKIP_EXT=1 installs without the extension on purpose).

Why --no-build-isolation: pip's isolated build environment would install a fresh torch (a CUDA
build, gigabytes) that may not match the one you run with; the extension must be built against
the torch it is loaded into.
"""

import glob
import os
import shlex
import subprocess
import sys
import tempfile
import warnings

import setuptools
from setuptools import find_packages, setup

# pyproject.toml's `license = "Apache-2.0"` (an SPDX string) needs setuptools >= 77; an older one
# rejects it with a schema error that does not say why. --no-build-isolation builds with the
# environment's setuptools, so say what is needed before setuptools reads pyproject.toml.
if int(setuptools.__version__.split(".")[0]) < 77:
    raise SystemExit(
        f"dlm-kernels: setuptools >= 77 is needed to build (found {setuptools.__version__}); "
        "run `pip install -U 'setuptools>=77'` and install again."
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _ext_modules():
    if _flag("DLM_KERNELS_SKIP_EXT"):
        print("dlm-kernels: DLM_KERNELS_SKIP_EXT=1, building no C++ extension", file=sys.stderr)
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as e:  # isolated build without torch
        raise SystemExit(
            "dlm-kernels: torch is not importable in the build environment. Install torch first, "
            "then build with `pip install --no-build-isolation .` (or set DLM_KERNELS_SKIP_EXT=1 "
            f"for a pure-Python install). Original error: {e}"
        ) from e

    debug = _flag("DLM_KERNELS_DEBUG")
    # -g0: Python's own CFLAGS often carry -g, which made the module 13 MB instead of ~1.
    cxx = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG", "-g0"]
    # -fno-math-errno / -fno-trapping-math let gcc if-convert and vectorise the float loops
    # (branch-free exp in csrc/common.h); unlike -ffast-math they keep NaN and inf semantics.
    cxx += ["-std=c++17", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas"]
    ldflags = []
    arch = os.environ.get("DLM_KERNELS_CPU_ARCH")  # unset: native; "": no -march at all
    if arch is None:
        cxx += [_NATIVE, _NATIVE_DEFINE]
    elif arch:
        cxx += [f"-march={arch}"] + ([_NATIVE_DEFINE] if arch == "native" else [])
    if _flag("DLM_KERNELS_NO_OPENMP"):
        cxx.append("-fopenmp-simd")
    else:  # replaced by -fopenmp-simd if the compiler cannot build and link OpenMP code
        cxx.append("-fopenmp")
        ldflags.append("-fopenmp")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    ext = CppExtension(
        name="dlm_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=ldflags,
    )
    ext.dlm_probe_march = arch is None  # only the default -march=native may be dropped
    return [ext], {"build_ext": _build_ext_class(BuildExtension.with_options(use_ninja=True))}


_NATIVE = "-march=native"
_NATIVE_DEFINE = "-DDLM_KERNELS_MARCH_NATIVE=1"  # read by a test: such a build uses AVX2 if any
_PROBE_PLAIN = "int main() { return 0; }\n"
_PROBE_OPENMP = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


def _probe(cxx: str, flags: list, source: str) -> tuple[bool, str]:
    """(ok, the compiler's last output lines): compile and link ``source`` with ``flags`` and
    the environment's own flags, as the real build will."""
    env_flags = [f for v in ("CPPFLAGS", "CXXFLAGS") for f in shlex.split(os.environ.get(v, ""))]
    ld_flags = shlex.split(os.environ.get("LDFLAGS", ""))
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.cpp")
        with open(src, "w") as f:
            f.write(source)
        cmd = [cxx, *env_flags, *flags, src, "-o", os.path.join(d, "probe"), *ld_flags]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=d)
        except (OSError, subprocess.SubprocessError) as e:
            return False, f"{type(e).__name__}: {e}"
        tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
        return r.returncode == 0, tail


def _build_ext_class(base):
    class BuildExt(base):
        """torch's BuildExtension, with the optional default flags probed first."""

        def build_extensions(self):
            from torch.utils.cpp_extension import get_cxx_compiler

            cxx = get_cxx_compiler()
            for ext in self.extensions:
                args = ext.extra_compile_args["cxx"]
                if getattr(ext, "dlm_probe_march", False) and _NATIVE in args:
                    ok, why = _probe(cxx, [_NATIVE], _PROBE_PLAIN)
                    if not ok:
                        _warn(f"{cxx} rejects {_NATIVE} ({why}); building for its default "
                              "target: the scalar code paths, not AVX2")  # fmt: skip
                        args.remove(_NATIVE)
                        args.remove(_NATIVE_DEFINE)
                if "-fopenmp" in args:
                    ok, why = _probe(cxx, ["-fopenmp"], _PROBE_OPENMP)
                    if not ok:
                        _warn(f"{cxx} cannot build and link OpenMP code ({why}); the CPU "
                              "kernels will run on one thread")  # fmt: skip
                        args[args.index("-fopenmp")] = "-fopenmp-simd"
                        ext.extra_link_args = [a for a in ext.extra_link_args if a != "-fopenmp"]
                if "-fopenmp-simd" in args and not _probe(cxx, ["-fopenmp-simd"], _PROBE_PLAIN)[0]:
                    args.remove("-fopenmp-simd")  # only hints: the loops stay correct without
            super().build_extensions()

    return BuildExt


def _warn(msg: str) -> None:
    # warnings.warn reaches the user through pip even without -v; the print, build logs.
    print(f"dlm-kernels: {msg}", file=sys.stderr)
    warnings.warn(f"dlm-kernels: {msg}", stacklevel=2)


ext_modules, cmdclass = _ext_modules()

setup(
    # dlm/corpus holds data only; named as a package so that setuptools keeps shipping it (it
    # warns that a data directory left out of `packages` will be ignored).
    packages=find_packages(include=["dlm_kernels", "dlm_kernels.*", "dlm", "dlm.*"])
    + ["dlm.corpus"],
    package_data={"dlm.corpus": ["*.gz", "*.tsv", "*.md"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
