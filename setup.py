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
    DLM_KERNELS_NO_OPENMP=1    build without OpenMP (single-threaded kernels).
    DLM_KERNELS_REQUIRE_EXT=1  fail the install if the extension does not build (`make` sets it).

Where the compiler rejects -march=ARCH or -fopenmp (Apple clang, for one, has no OpenMP), the
flag is dropped with a message; where the extension does not build at all, the package installs
without it (the CPU ops then run the PyTorch reference, and warn once at first use) unless
DLM_KERNELS_REQUIRE_EXT=1.

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

from setuptools import find_packages, setup

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
    arch = os.environ.get("DLM_KERNELS_CPU_ARCH", "native")
    if arch:
        cxx.append(f"-march={arch}")
        if arch == "native":  # read by a test: such a build on an AVX2 machine must use AVX2
            cxx.append("-DDLM_KERNELS_MARCH_NATIVE=1")
    if not _flag("DLM_KERNELS_NO_OPENMP"):
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
    return [ext], {"build_ext": _build_ext_class(BuildExtension.with_options(use_ninja=True))}


_PROBE_PLAIN = "int main() { return 0; }\n"
_PROBE_OPENMP = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


def _compiler_accepts(cxx: str, flags: list, source: str) -> bool:
    """True if the C++ compiler compiles and links ``source`` with ``flags``."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "probe.cpp")
        with open(src, "w") as f:
            f.write(source)
        cmd = [*shlex.split(cxx), *flags, src, "-o", os.path.join(d, "probe")]
        try:
            return subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def _build_ext_class(base):
    class BuildExt(base):
        """torch's BuildExtension, with the optional flags probed first and, unless
        DLM_KERNELS_REQUIRE_EXT=1, a pure-Python install when the extension does not build."""

        def build_extensions(self):
            from torch.utils.cpp_extension import get_cxx_compiler

            cxx = get_cxx_compiler()
            for ext in self.extensions:
                args = ext.extra_compile_args["cxx"]
                for flag in [a for a in args if a.startswith("-march=")]:
                    if not _compiler_accepts(cxx, [flag], _PROBE_PLAIN):
                        self._note(f"{cxx} rejects {flag}: building for its default target")
                        args.remove(flag)
                        if "-DDLM_KERNELS_MARCH_NATIVE=1" in args:
                            args.remove("-DDLM_KERNELS_MARCH_NATIVE=1")
                if "-fopenmp" in args and not _compiler_accepts(cxx, ["-fopenmp"], _PROBE_OPENMP):
                    self._note(f"{cxx} cannot build OpenMP code: the CPU kernels run on one thread")
                    args.remove("-fopenmp")
                    ext.extra_link_args = [a for a in ext.extra_link_args if a != "-fopenmp"]
            try:
                super().build_extensions()
            except Exception as e:  # compiler errors surface as several exception types
                if _flag("DLM_KERNELS_REQUIRE_EXT"):
                    raise
                self._note(
                    f"the C++ extension did not build ({type(e).__name__}: {e}). Installing "
                    "without it: the CPU ops run the PyTorch reference (slower). Set "
                    "DLM_KERNELS_REQUIRE_EXT=1 to make this an error."
                )
                self.extensions = []

        @staticmethod
        def _note(msg: str) -> None:
            print(f"dlm-kernels: {msg}", file=sys.stderr)

    return BuildExt


ext_modules, cmdclass = _ext_modules()

setup(
    packages=find_packages(include=["dlm_kernels", "dlm_kernels.*", "dlm", "dlm.*"]),
    package_data={"dlm": ["corpus/*.gz", "corpus/*.tsv", "corpus/*.md"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
