"""The build plumbing: env/arch parsing and nvcc discovery (build_tools.py), the compiled extension
dinotxt_fast._C and its loader dinotxt_fast._ext, and the csrc/common helper headers."""
import os
import re
import shutil
import stat
import subprocess
import textwrap

import pytest
import torch

import build_tools
from dinotxt_fast import _ext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_nvcc(directory):
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "nvcc")
    with open(path, "w") as f:
        f.write("#!/bin/sh\necho 'Cuda compilation tools, release 12.8, V12.8.93'\n")
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return path


def _extension_or_skip():
    """_C, or skip when it cannot have been built here (no nvcc, or disabled on purpose); otherwise a
    missing extension is a failure."""
    ext = _ext.extension()
    if ext is not None:
        return ext
    record = _ext.build_record()
    not_buildable = (record is None and build_tools.find_nvcc() is None) or (
        record is not None and record.get("reason") in (build_tools.REASON_NO_NVCC, build_tools.REASON_DISABLED))
    if not_buildable:
        pytest.skip(_ext.extension_error())
    pytest.fail(f"the CUDA extension is unavailable although nvcc is: {_ext.extension_error()}")


# ---- build_tools: environment parsing -------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("80;90a", ["80", "90a"]),
    ("90a", ["90a"]),
    ("80;86;90a", ["80", "86", "90a"]),
    ("8.0, 8.6 9.0a", ["80", "86", "90a"]),
    ("sm_90a;sm_80", ["90a", "80"]),
    ("10.0a;100f;120", ["100a", "100f", "120"]),
    ("80-real;90a-virtual", ["80-real", "90a-virtual"]),
    ("80;80;90a", ["80", "90a"]),
    ("native", ["native"]),
])
def test_parse_archs(text, expected):
    assert build_tools.parse_archs(text) == expected


@pytest.mark.parametrize("text, bad", [
    ("", "empty"), (" ; ", "empty"), ("8", "'8'"), ("80;x86", "'x86'"), ("45", "'45'"),
    ("compute_80", "'compute_80'"), ("90b", "'90b'"), ("80;native", "'native'"),
])
def test_parse_archs_rejects_with_the_bad_token(text, bad):
    with pytest.raises(ValueError, match=re.escape(bad)):
        build_tools.parse_archs(text)


def test_cuda_archs_default_and_override():
    assert build_tools.cuda_archs({}) == ["80", "90a"]
    assert build_tools.cuda_archs({"DINOTXT_FAST_CUDA_ARCHS": ""}) == ["80", "90a"]
    assert build_tools.cuda_archs({"DINOTXT_FAST_CUDA_ARCHS": "90a"}) == ["90a"]
    assert build_tools.cuda_archs({"DINOTXT_FAST_CUDA_ARCHS": "80;86;90a"}) == ["80", "86", "90a"]


@pytest.mark.parametrize("value, mode", [
    (None, "auto"), ("", "auto"), ("auto", "auto"), ("AUTO", "auto"),
    ("1", "force"), ("true", "force"), ("on", "force"), ("0", "skip"), ("false", "skip"), ("off", "skip"),
])
def test_build_mode(value, mode):
    env = {} if value is None else {"DINOTXT_FAST_BUILD_EXT": value}
    assert build_tools.build_mode(env) == mode


def test_build_mode_rejects_unknown_values():
    with pytest.raises(ValueError, match="DINOTXT_FAST_BUILD_EXT='2'"):
        build_tools.build_mode({"DINOTXT_FAST_BUILD_EXT": "2"})


def test_max_jobs():
    assert build_tools.max_jobs({"MAX_JOBS": "3"}) == 3
    assert build_tools.max_jobs({}) == (os.cpu_count() or 1)
    for bad in ("0", "-1", "two"):
        with pytest.raises(ValueError, match="MAX_JOBS"):
            build_tools.max_jobs({"MAX_JOBS": bad})


# ---- build_tools: nvcc discovery and the build decision -------------------------------------------

def test_find_nvcc_search_order(tmp_path):
    cudacxx = _fake_nvcc(str(tmp_path / "cudacxx"))
    home = _fake_nvcc(str(tmp_path / "home" / "bin"))
    cuda_path = _fake_nvcc(str(tmp_path / "cuda_path" / "bin"))
    on_path = _fake_nvcc(str(tmp_path / "on_path"))
    default = _fake_nvcc(str(tmp_path / "default" / "bin"))
    roots = (str(tmp_path / "default"),)
    env = {"CUDACXX": cudacxx, "CUDA_HOME": str(tmp_path / "home"), "CUDA_PATH": str(tmp_path / "cuda_path"),
           "PATH": str(tmp_path / "on_path")}
    assert build_tools.find_nvcc(env, roots) == cudacxx
    del env["CUDACXX"]
    assert build_tools.find_nvcc(env, roots) == home
    del env["CUDA_HOME"]
    assert build_tools.find_nvcc(env, roots) == cuda_path
    del env["CUDA_PATH"]
    assert build_tools.find_nvcc(env, roots) == on_path
    env["PATH"] = ""
    assert build_tools.find_nvcc(env, roots) == default
    assert build_tools.find_nvcc(env, (str(tmp_path / "nowhere"),)) is None


def test_find_nvcc_skips_missing_and_non_executable(tmp_path):
    not_executable = tmp_path / "plain" / "bin" / "nvcc"
    not_executable.parent.mkdir(parents=True)
    not_executable.write_text("")
    real = _fake_nvcc(str(tmp_path / "real" / "bin"))
    env = {"CUDACXX": str(tmp_path / "missing" / "nvcc"), "CUDA_HOME": str(tmp_path / "plain"),
           "CUDA_PATH": str(tmp_path / "real"), "PATH": ""}
    assert build_tools.find_nvcc(env, ()) == real


def test_nvcc_version_reads_the_release(tmp_path):
    assert build_tools.nvcc_version(_fake_nvcc(str(tmp_path))) == "12.8"


def test_plan_build_decisions(tmp_path):
    no_cuda = {"PATH": ""}
    plan = build_tools.plan_build({**no_cuda, "DINOTXT_FAST_BUILD_EXT": "0"}, default_roots=())
    assert not plan.build and plan.reason == build_tools.REASON_DISABLED
    assert "DINOTXT_FAST_BUILD_EXT=0" in plan.message

    plan = build_tools.plan_build(no_cuda, default_roots=())
    assert not plan.build and plan.reason == build_tools.REASON_NO_NVCC
    assert "nvcc not found" in plan.message and "pure-Python" in plan.message and "\n" not in plan.message

    with pytest.raises(RuntimeError, match="DINOTXT_FAST_BUILD_EXT=1 but nvcc was not found"):
        build_tools.plan_build({**no_cuda, "DINOTXT_FAST_BUILD_EXT": "1"}, default_roots=())
    # A malformed arch list is reported even where nvcc is missing.
    with pytest.raises(ValueError, match="'9x'"):
        build_tools.plan_build({**no_cuda, "DINOTXT_FAST_CUDA_ARCHS": "9x"}, default_roots=())

    nvcc = _fake_nvcc(str(tmp_path / "cuda" / "bin"))
    plan = build_tools.plan_build({"CUDA_HOME": str(tmp_path / "cuda"), "DINOTXT_FAST_CUDA_ARCHS": "9.0a"}, ())
    assert plan.build and not plan.force and plan.nvcc == nvcc and plan.archs == ["90a"] and plan.message is None
    plan = build_tools.plan_build({"CUDA_HOME": str(tmp_path / "cuda"), "DINOTXT_FAST_BUILD_EXT": "1"}, ())
    assert plan.build and plan.force and plan.archs == ["80", "90a"]


# ---- dinotxt_fast._ext ----------------------------------------------------------------------------

def test_not_built_reasons_come_from_the_build_record(tmp_path, monkeypatch):
    status = tmp_path / "_build_status.json"
    monkeypatch.setattr(_ext, "_STATUS_FILE", str(status))
    assert _ext.build_record() is None
    assert "no build record" in _ext._not_built_reason(_ext.build_record())

    status.write_text('{"built": false, "reason": "nvcc_missing", "detail": "nvcc not found (looked in: PATH)"}')
    assert _ext._not_built_reason(_ext.build_record()) == \
        "dinotxt_fast._C was not built: nvcc not found (looked in: PATH)"

    status.write_text('{"built": true, "reason": null, "detail": null}')
    assert "was built but is missing" in _ext._not_built_reason(_ext.build_record())

    status.write_text("{not json")
    record = _ext.build_record()
    assert record["reason"] == "corrupt_record"
    assert "unreadable" in _ext._not_built_reason(record)


def test_extension_is_importable_when_built():
    ext = _extension_or_skip()
    assert _ext.extension_error() is None
    import dinotxt_fast._C as direct
    assert direct is ext


def test_cuda_info_never_raises_and_has_the_documented_keys():
    info = _ext.cuda_info()
    assert set(info) == set(_ext.CUDA_INFO_KEYS)
    assert isinstance(info["device_count"], int) and len(info["devices"]) <= info["device_count"]
    if not torch.cuda.is_available():
        assert info["device_count"] == 0 and info["devices"] == []
        assert isinstance(info["error"], str) and info["error"]


def test_cuda_info_from_the_extension():
    ext = _extension_or_skip()
    info, build = ext.cuda_info(), ext.build_info()
    assert set(info) == set(_ext.CUDA_INFO_KEYS)
    assert info["runtime_version"] == build["cuda_version_compiled"]  # static cudart: they are one
    assert info["compiled_archs"] == build["archs"]
    assert info["driver_version"] is None or re.fullmatch(r"\d+\.\d+", info["driver_version"])
    if not torch.cuda.is_available():
        assert info["device_count"] == 0 and info["devices"] == []
        assert "cudaGetDeviceCount failed" in info["error"]


def test_build_info_lists_the_archs():
    ext = _extension_or_skip()
    build = ext.build_info()
    assert set(build) == {"cuda_version_compiled", "archs", "compiler", "cuda_compiler", "cudart", "version"}
    record = _ext.build_record()
    if record is not None:
        assert build["archs"] == record["archs"]
    assert build["archs"] and all(build_tools.parse_archs(a) == [a] for a in build["archs"])
    assert re.fullmatch(r"\d+\.\d", build["cuda_version_compiled"])
    assert build["cudart"] == "static"
    from dinotxt_fast.version import __version__
    assert build["version"] == __version__


@pytest.mark.skipif(shutil.which("readelf") is None or shutil.which("nm") is None, reason="needs binutils")
def test_extension_needs_neither_torch_nor_a_shared_cudart():
    ext = _extension_or_skip()
    needed = subprocess.run(["readelf", "-d", ext.__file__], capture_output=True, text=True, check=True).stdout
    libraries = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", needed)
    assert libraries, needed
    assert not [lib for lib in libraries if re.match(r"lib(cudart|torch|c10|cuda\.|python)", lib)], libraries
    exported = subprocess.run(["nm", "-D", "--defined-only", ext.__file__],
                              capture_output=True, text=True, check=True).stdout.split()
    assert "PyInit__C" in exported
    assert not [s for s in exported if s.startswith(("cuda", "__cuda"))], "static cudart symbols are exported"


def test_current_stream_ptr_needs_a_cuda_device():
    with pytest.raises(ValueError, match="needs a CUDA device, got cpu"):
        _ext.current_stream_ptr("cpu")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        _ext.current_stream_ptr(torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.prove
def test_current_stream_ptr_matches_torch():
    device = torch.device("cuda", 0)
    assert _ext.current_stream_ptr(device) == torch.cuda.current_stream(device).cuda_stream
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        assert _ext.current_stream_ptr(0) == stream.cuda_stream != 0
        assert _ext.current_stream_ptr() == stream.cuda_stream


@pytest.mark.gpu
@pytest.mark.prove
def test_cuda_info_matches_torch_on_a_gpu():
    ext = _extension_or_skip()
    info = ext.cuda_info()
    assert info["error"] is None
    assert info["device_count"] == torch.cuda.device_count() == len(info["devices"])
    for device in info["devices"]:
        props = torch.cuda.get_device_properties(device["index"])
        assert device["name"] == props.name
        assert device["capability"] == (props.major, props.minor)
        assert device["sm_count"] == props.multi_processor_count
        assert device["total_memory"] == props.total_memory
        assert device["l2_cache_size"] > 0 and device["max_shared_memory_per_block_optin"] >= 48 * 1024


# ---- csrc/common headers: error checking and argument validation ----------------------------------

HEADER_PROGRAM = textwrap.dedent(r"""
    #include <cstdio>
    #include "common/check.h"
    #include "common/launch.h"
    using namespace dinotxt_fast;

    template <typename F> void expect_invalid(const char* label, F f) {
      try { f(); std::printf("%s: no exception\n", label); }
      catch (const std::invalid_argument& e) { std::printf("%s: invalid_argument: %s\n", label, e.what()); }
    }

    int main() {
      DTF_CUDA_CHECK(cudaSuccess);
      try {
        DTF_CUDA_CHECK(cudaErrorInvalidValue);  // CHECK_LINE
        std::printf("check: no exception\n");
      } catch (const CudaError& e) {
        const std::runtime_error& base = e;  // pybind11 turns runtime_error into RuntimeError
        std::printf("check: code %d: %s\n", static_cast<int>(e.code()), base.what());
      }
      expect_invalid("null", [] { as_ptr<float>(0, "q"); });
      expect_invalid("misaligned", [] { as_ptr<float>(0x1002, "k"); });
      expect_invalid("misaligned16", [] { as_ptr<float>(0x1004, "v", 16); });
      expect_invalid("aligned16", [] { as_ptr<float>(0x1010, "v", 16); });
      expect_invalid("positive", [] { require_positive(0, "seq_len"); });
      expect_invalid("multiple", [] { require_multiple_of(100, 64, "head_dim"); });
      expect_invalid("require", [] { require(false, "q has ", 3, " heads, expected ", 4); });
      std::printf("ptr: %d\n", as_ptr<float>(0x1000, "x") == reinterpret_cast<float*>(0x1000));
      std::printf("stream: %d %d\n", as_stream(0) == nullptr,
                  as_stream(0x1234) == reinterpret_cast<cudaStream_t>(0x1234));
      std::printf("ceil_div: %d %lld\n", ceil_div(10, 4), static_cast<long long>(ceil_div<long long>(1LL << 40, 3)));
      return 0;
    }
""")


def test_common_headers_check_and_validate(tmp_path):
    nvcc = build_tools.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA headers cannot be compiled here")
    source = tmp_path / "headers_test.cu"
    source.write_text(HEADER_PROGRAM)
    binary = tmp_path / "headers_test"
    # Host-only program: nvcc links the static cudart by default, so it runs without a GPU or driver.
    subprocess.run([nvcc, "-std=c++17", "-arch=sm_80", "-I", os.path.join(REPO, "csrc"), str(source),
                    "-o", str(binary)], check=True, capture_output=True, text=True)
    out = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())

    check_line = HEADER_PROGRAM.splitlines().index(next(
        line for line in HEADER_PROGRAM.splitlines() if "CHECK_LINE" in line)) + 1
    assert lines["check"] == (f"code 1: {source}:{check_line}: cudaErrorInvalidValue failed: "
                              "cudaErrorInvalidValue (invalid argument)")
    assert lines["null"] == "invalid_argument: q is a null pointer"
    assert lines["misaligned"] == "invalid_argument: k (0x1002) is not aligned to 4 bytes"
    assert lines["misaligned16"] == "invalid_argument: v (0x1004) is not aligned to 16 bytes"
    assert lines["aligned16"] == "no exception"
    assert lines["positive"] == "invalid_argument: seq_len must be positive, got 0"
    assert lines["multiple"] == "invalid_argument: head_dim must be a multiple of 64, got 100"
    assert lines["require"] == "invalid_argument: q has 3 heads, expected 4"
    assert lines["ptr"] == "1" and lines["stream"] == "1 1"
    assert lines["ceil_div"] == f"3 {-(-(1 << 40) // 3)}"
