"""Build-time helpers for setup.py: environment parsing and nvcc discovery.

Kept free of setuptools so tests can import it from the source tree.
Environment variables:
  DINOTXT_FAST_BUILD_EXT   auto (default): build dinotxt_fast._C when nvcc is found;
                           1: build it or fail; 0: never build it.
  DINOTXT_FAST_CUDA_ARCHS  CUDA architectures, e.g. "90a" or "80;86;90a" (default "80;90a").
  DINOTXT_FAST_NVCC_FLAGS  extra nvcc flags, e.g. "-Xptxas -v" to print register usage.
  MAX_JOBS                 parallel compile jobs (default: the number of CPUs).
  CUDACXX, CUDA_HOME, CUDA_PATH, PATH: where nvcc is looked for, in that order, then /usr/local/cuda/bin.
"""
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field

DEFAULT_CUDA_ARCHS = "80;90a"
DEFAULT_CUDA_ROOTS = ("/usr/local/cuda",)

# Reasons recorded in the build record (dinotxt_fast/_build_status.json) when _C is not built.
REASON_DISABLED = "disabled"
REASON_NO_NVCC = "nvcc_missing"
REASON_FAILED = "build_failed"

_TRUE = {"1", "true", "yes", "on", "force"}
_FALSE = {"0", "false", "no", "off", "skip"}
# CMake's own architecture keywords are passed through unchanged.
_CMAKE_ARCH_KEYWORDS = {"native", "all", "all-major"}
_ARCH_RE = re.compile(r"^(?:sm_)?(\d+)(?:\.(\d))?([af]?)(-real|-virtual)?$")


def build_mode(env=None):
    """Return "auto", "force" or "skip" from DINOTXT_FAST_BUILD_EXT."""
    env = os.environ if env is None else env
    value = env.get("DINOTXT_FAST_BUILD_EXT", "auto").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in _TRUE:
        return "force"
    if value in _FALSE:
        return "skip"
    raise ValueError(f"DINOTXT_FAST_BUILD_EXT={value!r} is not one of auto, 1, 0")


def parse_archs(text):
    """Parse a CUDA architecture list into CMake's form: "8.0;9.0a" -> ["80", "90a"].

    Separators may be ';', ',' or spaces. Accepted tokens: 80, 90a, 100f, 8.0, 9.0a, sm_90a,
    an optional CMake -real/-virtual suffix, or one of CMake's keywords native/all/all-major.
    """
    tokens = [t for t in re.split(r"[;,\s]+", text.strip()) if t]
    if not tokens:
        raise ValueError("CUDA architecture list is empty (set e.g. DINOTXT_FAST_CUDA_ARCHS='80;90a')")
    archs = []
    for token in tokens:
        if token.lower() in _CMAKE_ARCH_KEYWORDS:
            if len(tokens) != 1:
                raise ValueError(f"CUDA architecture {token!r} must be used alone, got {text!r}")
            return [token.lower()]
        match = _ARCH_RE.match(token.lower())
        arch = None
        if match is not None:
            number, minor, feature, suffix = match.groups()
            arch = number + (minor or "")
        if arch is None or int(arch) < 50 or (minor is None and len(number) < 2):
            raise ValueError(f"invalid CUDA architecture {token!r} in {text!r} "
                             "(expected e.g. 80, 90a, 8.6, sm_90a)")
        arch = arch + feature + (suffix or "")
        if arch not in archs:
            archs.append(arch)
    return archs


def cuda_archs(env=None):
    """The architectures to compile for: DINOTXT_FAST_CUDA_ARCHS or the default 80;90a."""
    env = os.environ if env is None else env
    return parse_archs(env.get("DINOTXT_FAST_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS)


def nvcc_candidates(env=None, default_roots=DEFAULT_CUDA_ROOTS):
    """Places nvcc is looked for, in order: $CUDACXX, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, defaults."""
    env = os.environ if env is None else env
    candidates = []
    if env.get("CUDACXX"):
        candidates.append(env["CUDACXX"])
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(var):
            candidates.append(os.path.join(env[var], "bin", "nvcc"))
    on_path = shutil.which("nvcc", path=env.get("PATH", ""))
    if on_path:
        candidates.append(on_path)
    candidates.extend(os.path.join(root, "bin", "nvcc") for root in default_roots)
    return candidates


def find_nvcc(env=None, default_roots=DEFAULT_CUDA_ROOTS):
    """Path of the first executable nvcc in nvcc_candidates(), or None."""
    for path in nvcc_candidates(env, default_roots):
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path)
    return None


def nvcc_version(nvcc):
    """CUDA release of an nvcc binary, e.g. "13.0"."""
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    if match is None:
        raise RuntimeError(f"cannot read the CUDA release from `{nvcc} --version`:\n{out}")
    return match.group(1)


def cuda_root(nvcc):
    """Toolkit root of an nvcc, also when nvcc is a wrapper script outside the toolkit."""
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.isfile(os.path.join(guess, "include", "cuda_runtime.h")):
        return guess
    # nvcc's dry run prints the toolkit it belongs to as "#$ TOP=<root>/bin/..".
    out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True)
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"cannot locate the CUDA toolkit of {nvcc}")
    return os.path.normpath(match.group(1).strip())


def max_jobs(env=None):
    """Parallel compile jobs: MAX_JOBS, or the CPU count."""
    env = os.environ if env is None else env
    value = env.get("MAX_JOBS", "").strip()
    if not value:
        return os.cpu_count() or 1
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"MAX_JOBS={value!r} is not a positive integer")
    return int(value)


@dataclass
class BuildPlan:
    build: bool
    force: bool
    nvcc: str = None
    archs: list = field(default_factory=list)
    reason: str = None        # one of the REASON_* codes when build is False
    detail: str = None        # why, in words, when build is False

    @property
    def message(self):
        """The one build-log line saying that _C is not built (None when it is)."""
        return None if self.build else skip_message(self.detail)


def skip_message(detail):
    return (f"dinotxt-fast: NOT building the CUDA extension dinotxt_fast._C: {detail}; installing the "
            "pure-Python package (torch/Triton backends only).")


def plan_build(env=None, default_roots=DEFAULT_CUDA_ROOTS):
    """Decide whether to build dinotxt_fast._C. Raises RuntimeError when forced and nvcc is missing."""
    env = os.environ if env is None else env
    mode = build_mode(env)
    if mode == "skip":
        return BuildPlan(False, False, reason=REASON_DISABLED, detail="disabled by DINOTXT_FAST_BUILD_EXT=0")
    archs = cuda_archs(env)  # validated even when nvcc is missing, so a typo never goes unnoticed
    nvcc = find_nvcc(env, default_roots)
    if nvcc is None:
        looked = ", ".join(["$CUDACXX", "$CUDA_HOME/bin", "$CUDA_PATH/bin", "PATH"]
                           + [os.path.join(root, "bin") for root in default_roots])
        if mode == "force":
            raise RuntimeError(f"DINOTXT_FAST_BUILD_EXT=1 but nvcc was not found (looked in: {looked}); "
                               "set CUDA_HOME or CUDACXX")
        return BuildPlan(False, False, archs=archs, reason=REASON_NO_NVCC,
                         detail=f"nvcc not found (looked in: {looked}; set CUDA_HOME to build it)")
    return BuildPlan(True, mode == "force", nvcc=nvcc, archs=archs)
