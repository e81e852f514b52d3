"""Builds the optional CUDA extension dinotxt_fast._C with CMake; metadata lives in pyproject.toml.

Whether and how _C is built is controlled by environment variables (see build_tools.py):
DINOTXT_FAST_BUILD_EXT=auto|1|0, DINOTXT_FAST_CUDA_ARCHS, DINOTXT_FAST_NVCC_FLAGS, MAX_JOBS.
"""
import json
import os
import shutil
import subprocess
import sys
import time

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)  # PEP 517 backends do not put the project directory on sys.path
import build_tools  # noqa: E402

EXT_NAME = "dinotxt_fast._C"
STATUS_NAME = "_build_status.json"  # read by dinotxt_fast._ext to explain a missing _C


class ExtensionBuildError(RuntimeError):
    """A step of the CMake build failed; the tool's own output is above it in the build log."""


def _run_step(what, command):
    try:
        subprocess.run(command, check=True)
    except subprocess.CalledProcessError as error:
        raise ExtensionBuildError(f"{what} failed with exit status {error.returncode}") from None


def _package_version():
    scope = {}
    with open(os.path.join(ROOT, "dinotxt_fast", "version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def _tool(module_name, attr, exe):
    """Path of cmake/ninja: from the PyPI package of that name when installed (build isolation), else PATH."""
    try:
        module = __import__(module_name)
        path = os.path.join(getattr(module, attr), exe)
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    path = shutil.which(exe)
    if path is None:
        raise ExtensionBuildError(f"{exe} not found (pip install {module_name})")
    return path


class CMakeBuildExt(build_ext):
    """Runs CMake for dinotxt_fast._C, or records why it was not built and installs pure Python."""

    def run(self):
        self._plan = plan = build_tools.plan_build()
        if plan.build:
            started = time.perf_counter()
            try:
                super().run()  # calls build_extension(), then copies into the source tree when editable
            except (RuntimeError, OSError, subprocess.SubprocessError) as error:  # incl. a broken nvcc
                if plan.force:
                    raise RuntimeError(f"DINOTXT_FAST_BUILD_EXT=1 and building {EXT_NAME} failed: {error}") from error
                self._skip(build_tools.REASON_FAILED,
                           f"its build failed ({error}; reinstall with `pip install -v` to see the compiler "
                           "output, or set DINOTXT_FAST_BUILD_EXT=1 to make this an error)", plan)
                return
            print(f"dinotxt-fast: built {EXT_NAME} for CUDA archs {';'.join(plan.archs)} "
                  f"in {time.perf_counter() - started:.0f} s", flush=True)
            self._write_status({"built": True, "reason": None, "detail": None, "archs": plan.archs,
                                "nvcc": plan.nvcc})
        else:
            self._skip(plan.reason, plan.detail, plan)

    def _skip(self, reason, detail, plan):
        print(build_tools.skip_message(detail), file=sys.stderr, flush=True)
        # A module left by an earlier build (in build/lib, or in the source tree from an editable install)
        # would contradict this decision and end up installed.
        stale = [os.path.join(self.build_lib, self.get_ext_filename(EXT_NAME))]
        if self.inplace or self.editable_mode:
            stale.append(os.path.join(ROOT, self.get_ext_filename(EXT_NAME)))
        for path in stale:
            if os.path.exists(path):
                os.remove(path)
        self._write_status({"built": False, "reason": reason, "detail": detail, "archs": plan.archs,
                            "nvcc": plan.nvcc})
        self._ext_skipped = True

    def _status_paths(self):
        """(build_lib copy, source-tree copy) of the build record; the latter is used by editable installs."""
        return (os.path.join(self.build_lib, "dinotxt_fast", STATUS_NAME),
                os.path.join(ROOT, "dinotxt_fast", STATUS_NAME))

    def _write_status(self, status):
        built, in_source = self._status_paths()
        for path in [built, in_source] if (self.inplace or self.editable_mode) else [built]:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(status, f, indent=1)

    def get_outputs(self):
        outputs = [] if getattr(self, "_ext_skipped", False) else super().get_outputs()
        return outputs + [self._status_paths()[0]]

    def get_output_mapping(self):
        mapping = {} if getattr(self, "_ext_skipped", False) else super().get_output_mapping()
        if self.inplace or self.editable_mode:
            built, in_source = self._status_paths()
            mapping[built] = in_source
        return mapping

    def build_extension(self, ext):
        plan = self._plan
        ext_path = os.path.abspath(self.get_ext_fullpath(ext.name))
        ext_dir = os.path.dirname(ext_path)
        build_dir = os.path.join(os.path.abspath(self.build_temp), "cmake")
        cmake, ninja = _tool("cmake", "CMAKE_BIN_DIR", "cmake"), _tool("ninja", "BIN_DIR", "ninja")
        import pybind11

        config = [
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={plan.nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(plan.archs)}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_dir}",
            f"-DDINOTXT_FAST_EXT_SUFFIX={os.path.basename(ext_path)[len('_C'):]}",
            f"-DDINOTXT_FAST_VERSION={_package_version()}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCUDAToolkit_ROOT={build_tools.cuda_root(plan.nvcc)}",
        ]
        extra_nvcc = os.environ.get("DINOTXT_FAST_NVCC_FLAGS", "").strip()
        if extra_nvcc:
            config.append(f"-DCMAKE_CUDA_FLAGS={extra_nvcc}")

        # A build tree configured by another cmake/python (each isolated pip build has its own) is
        # not reusable: start it afresh instead of failing on a stale cache.
        stamp_path = os.path.join(build_dir, "dinotxt_fast_config.json")
        stamp = json.dumps({"cmake": cmake, "config": config})
        if os.path.exists(stamp_path):
            with open(stamp_path) as f:
                if f.read() != stamp:
                    shutil.rmtree(build_dir)
        os.makedirs(build_dir, exist_ok=True)

        jobs = build_tools.max_jobs()
        print(f"dinotxt-fast: building {EXT_NAME} with nvcc {build_tools.nvcc_version(plan.nvcc)} ({plan.nvcc}) "
              f"for CUDA archs {';'.join(plan.archs)}, {jobs} parallel jobs", flush=True)
        with open(stamp_path, "w") as f:
            f.write(stamp)
        _run_step("CMake configure", [cmake, "-S", ROOT, "-B", build_dir, "-G", "Ninja", *config])
        _run_step("CMake build", [cmake, "--build", build_dir, "--parallel", str(jobs)])
        if not os.path.isfile(ext_path):
            raise ExtensionBuildError(f"CMake finished but {ext_path} was not produced")


setup(
    ext_modules=[Extension(EXT_NAME, sources=[])],  # sources are compiled by CMake, not setuptools
    cmdclass={"build_ext": CMakeBuildExt},
)
