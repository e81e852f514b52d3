"""The CUDA fused attention forward (csrc/attention, dinotxt_fast/ops/cuda/attention.py) and the "cuda" backend's
attention family (this forward, the Triton backward through the dispatch).

Without a GPU: the Python wrapper and the C++ launcher reject bad input with clear errors before touching a device,
the extension binds the entry points, and the backend composes its backward from the "triton" backend's at call time.
With a GPU (marked): every path against the float64 reference at odd N and real shapes, error at most twice PyTorch's
own in that dtype (docs/design.md, "Testing and evidence"), lse against the float64 lse, NaN-poisoned outputs (the
poison fixture, for every test here), the "cuda" backend's forward + Triton backward against float64 gradients, and
compute-sanitizer memcheck / racecheck. The compile-time checks (ptxas, SASS) are in test_attention_cuda_build.py.
"""
import functools
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import build_tools
from dinotxt_fast import _ext, ops
from dinotxt_fast.ops import dispatch
from dinotxt_fast.ops.cuda import attention as cattn
from dinotxt_fast.ops.reference import attention as ref_attention

from .backends import PROVE

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("poison")


def _extension_or_skip():
    ext = _ext.extension()
    if ext is None:
        record = _ext.build_record()
        if build_tools.find_nvcc() is None or (record is not None and record.get("reason") in (
                build_tools.REASON_NO_NVCC, build_tools.REASON_DISABLED)):
            pytest.skip(_ext.extension_error())
        pytest.fail(f"the CUDA extension is unavailable although nvcc is: {_ext.extension_error()}")
    return ext


# ------------------------------------------------------------------------------------- input checks (CPU)
def _cpu(*shape, dtype=torch.float16):
    return torch.zeros(*shape, dtype=dtype)


@pytest.fixture
def no_extension(monkeypatch):
    """Fails the test if the wrapper reaches the extension."""
    def reached():
        raise AssertionError("the wrapper reached the extension before rejecting its input")
    monkeypatch.setattr(cattn, "_extension", reached)


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((_cpu(1, 5, 2, 64),) * 3, {}, ValueError, "one CUDA device"),
    ((_cpu(1, 5, 2, 64, dtype=torch.float32),) * 3, {}, TypeError, "float16 or all bfloat16"),
    ((_cpu(1, 5, 2, 64), _cpu(1, 5, 2, 64), _cpu(1, 5, 2, 64, dtype=torch.bfloat16)), {}, TypeError, "all bfloat16"),
    ((_cpu(1, 5, 2, 32),) * 3, {}, ValueError, "head dims"),
    ((_cpu(1, 5, 2, 64), _cpu(1, 5, 2, 64), _cpu(1, 5, 2, 128)), {}, ValueError, "head dims must be equal"),
    ((_cpu(1, 5, 2, 64), _cpu(1, 5, 3, 64), _cpu(1, 5, 3, 64)), {}, ValueError, "mismatched shapes"),
    ((_cpu(1, 5, 2, 64), _cpu(1, 6, 2, 64), _cpu(1, 7, 2, 64)), {}, ValueError, "mismatched shapes"),
    ((_cpu(5, 2, 64),) * 3, {}, ValueError, "4-d tensor"),
    ((_cpu(1, 0, 2, 64),) * 3, {}, ValueError, "empty"),
    ((_cpu(1, 5, 2, 64), _cpu(1, 7, 2, 64), _cpu(1, 7, 2, 64)), {"causal": True}, ValueError, "Nq == Nk"),
    ((_cpu(2, 5, 2, 64),) * 3, {"lengths": torch.tensor([1.0, 2.0])}, TypeError, "int32/int64"),
    ((_cpu(2, 5, 2, 64),) * 3, {"lengths": torch.tensor([1, 2, 3])}, ValueError, r"shape \(2,\)"),
    ((_cpu(1, 5, 2, 64),) * 3, {"path": "sm70"}, ValueError, "path must be one of"),
])
def test_wrapper_rejects_bad_input_before_the_extension(no_extension, args, kwargs, error, match):
    kwargs = {"causal": False, "scale": 0.125, **kwargs}
    with pytest.raises(error, match=match):
        cattn.forward(*args, **kwargs)


def test_path_environment_variable(monkeypatch):
    monkeypatch.delenv(cattn.PATH_ENV_VAR, raising=False)
    assert cattn.requested_path() == "auto"
    for value, path in (("sm80", "sm80"), (" SM90 ", "sm90"), ("auto", "auto"), ("", "auto")):
        monkeypatch.setenv(cattn.PATH_ENV_VAR, value)
        assert cattn.requested_path() == path
    monkeypatch.setenv(cattn.PATH_ENV_VAR, "hopper")
    with pytest.raises(ValueError, match=f"{cattn.PATH_ENV_VAR}='hopper'"):
        cattn.requested_path()


def _fake_cuda_tensor(dtype=torch.bfloat16, shape=(2, 5, 3, 64), stride_d=1):
    """What supports() reads of a tensor (device, dtype, shape, strides), without needing a GPU."""
    return types.SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=shape,
                                 stride=lambda dim: stride_d if dim in (-1, 3) else 64)


@pytest.mark.parametrize("tensor,info,match", [
    (_cpu(1, 5, 2, 64), {}, "needs CUDA tensors"),
    (_fake_cuda_tensor(torch.float32), {}, "fp16 or bf16"),
    (_fake_cuda_tensor(), {"head_dim": 96, "value_dim": 96}, "Dh == Dv"),
    (_fake_cuda_tensor(), {"head_dim": 64, "value_dim": 128}, "Dh == Dv"),
    (_fake_cuda_tensor(stride_d=2), {"head_dim": 64, "value_dim": 64}, "unit stride"),
    (_fake_cuda_tensor(), {"head_dim": 64, "value_dim": 64, "batch_heads": 2**31}, "int32"),
    (_fake_cuda_tensor(), {"head_dim": 128, "value_dim": 128, "batch_heads": 20480}, None),
    (_fake_cuda_tensor(torch.float16), {"head_dim": 64, "value_dim": 64, "causal": True}, None),
])
def test_supports_reasons(tensor, info, match):
    reason = cattn.supports(tensor, info)
    if match is None:
        assert reason is None
    else:
        assert reason is not None and re.search(match, reason), reason


# ------------------------------------------------------------------------------- extension (CPU-checkable)
def test_extension_binds_the_attention_entry_points():
    ext = _extension_or_skip()
    assert callable(ext.attention_forward)
    assert isinstance(ext.attention_sm90_compiled(), bool)


def test_cuda_backend_composes_its_forward_with_the_triton_backward_at_call_time(monkeypatch):
    """The "cuda" attention registers this forward and a backward that runs whatever the "triton" backend holds for
    attention_backward when it is called (looked up in the dispatch, not imported)."""
    _extension_or_skip()
    pytest.importorskip("dinotxt_fast.ops.triton.attention")
    backend = dispatch.registered()["cuda"]
    assert "attention" in backend.families()
    assert backend.kernels["attention_forward"] is cattn.attention_forward
    calls = []

    def triton_backward(*args):
        calls.append(len(args))
        return "the triton backward's result"

    monkeypatch.setitem(dispatch.registered()["triton"].kernels, "attention_backward", triton_backward)
    got = backend.kernels["attention_backward"]("go", "q", "k", "v", "o", "lse", True, 0.125, None)
    assert got == "the triton backward's result" and calls == [9]


_ADDR = 1 << 20  # a 16-byte aligned fake device address: validation runs before anything dereferences it


def _launcher_args(**overrides):
    args = dict(q=_ADDR, k=_ADDR, v=_ADDR, o=_ADDR, lse=_ADDR, lengths=0, dtype=2, batch=2, seq_q=5, seq_k=5, heads=3,
                head_dim=64, q_strides=(960, 192, 64), k_strides=(960, 192, 64), v_strides=(960, 192, 64),
                o_strides=(960, 192, 64), causal=False, scale=0.125, path=1, stream=0)
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides,match", [
    ({"dtype": 0}, "dtype code must be 1"),
    ({"head_dim": 96}, "head dim must be 64 or 128"),
    ({"seq_k": 0}, "key length must be positive"),
    ({"batch": 2**20, "heads": 2**12}, "exceeds"),
    ({"seq_q": 4, "causal": True}, "Nq == Nk"),
    ({"scale": float("nan")}, "scale must be finite"),
    ({"q": _ADDR + 8}, "q .* is not aligned to 16 bytes"),
    ({"o": 0}, "o is a null pointer"),
    ({"lengths": _ADDR + 2}, "lengths .* is not aligned"),
    ({"k_strides": (960, 196, 64)}, "k's token stride 196 is not a multiple of 8"),
    ({"v_strides": (960, -192, 64)}, "v has a negative token stride"),
    ({"path": 7}, "path must be 0"),
])
def test_launcher_rejects_bad_parameters(overrides, match):
    ext = _extension_or_skip()
    with pytest.raises(ValueError, match=match):
        ext.attention_forward(**_launcher_args(**overrides))


def test_launcher_ignores_the_strides_of_size_one_dimensions():
    """A size-1 batch or head dimension may carry any stride (torch leaves them arbitrary): never a reason to copy.
    Without a GPU the call gets past validation and fails on the device query instead."""
    ext = _extension_or_skip()
    args = _launcher_args(batch=1, heads=1, q_strides=(3, 64, 5), path=7)
    with pytest.raises(ValueError, match="path must be 0"):  # validation passed; the path check comes next
        ext.attention_forward(**args)


# ------------------------------------------------------------------------------------------------ GPU tests
def _cuda_paths():
    """The kernels this machine can run."""
    if not torch.cuda.is_available() or _ext.extension() is None:
        return []
    paths = ["sm80"]
    if torch.cuda.get_device_capability() == (9, 0) and _ext.extension().attention_sm90_compiled():
        paths.append("sm90")
    return paths


def _skip_unless_runnable(path):
    if "attention" not in ops.backends().get("cuda", {}).get("ops", []):
        pytest.skip(f"the CUDA attention kernels are not available: {ops.backends().get('cuda')}")
    if path not in _cuda_paths():
        pytest.skip(f"path {path} needs a compute capability 9.0 device and an sm_90a build")


def _make(b, n, h, d, dtype, layout="contiguous", seed=0):
    """q, k, v [b, n, h, d] on the GPU: contiguous, or strided views of one fused [b, n, 3, h, d] projection."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    if layout == "fused":
        return torch.randn(b, n, 3, h, d, device="cuda", generator=g).to(dtype).unbind(2)
    return tuple(torch.randn(b, n, h, d, device="cuda", generator=g).to(dtype) for _ in range(3))


def _sdpa(q, k, v, causal, scale, lengths):
    """PyTorch's SDPA in the inputs' dtype, [B,N,H,D] layout; rows that see no key come out NaN there."""
    n_q, n_k = q.shape[1], k.shape[1]
    mask = None
    if lengths is not None:
        mask = (torch.arange(n_k, device=q.device) < lengths.to(q.device)[:, None])[:, None, None, :]
        if causal:
            mask = mask & torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril()
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask,
                                         is_causal=causal and mask is None, scale=scale)
    return out.transpose(1, 2)


def _check_forward(q, k, v, causal, lengths, path, scale=None):
    """Kernel vs the float64 reference of the same (low-precision) inputs: max error at most twice that of PyTorch's
    SDPA in the same dtype plus half an ulp at 1; lse close to the float64 lse; rows without keys exactly 0/-inf."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, lse, ran = cattn.forward(q, k, v, causal, scale, lengths, path=path)
    assert ran == path
    assert o.shape == q.shape and o.dtype == q.dtype and o.is_contiguous()
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    want_o, want_lse = ref_attention.attention_forward(q.double(), k.double(), v.double(), causal, scale, lengths)
    assert not o.isnan().any() and not lse.isnan().any()
    seen = want_lse.transpose(1, 2).isfinite()  # [B, N, H]: rows that see at least one key
    err = (o.double() - want_o).abs().amax(-1)
    torch_err = (_sdpa(q, k, v, causal, scale, lengths).double() - want_o).abs().amax(-1)
    slack = 0.5 * torch.finfo(q.dtype).eps
    e, e_torch = err[seen].max().item(), torch_err[seen].max().item()
    assert e <= 2 * e_torch + slack, f"error {e:.3e} vs PyTorch {q.dtype} SDPA {e_torch:.3e}"
    assert (o[~seen] == 0).all()
    torch.testing.assert_close(lse, want_lse.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@PROVE
@pytest.mark.parametrize("path", ["sm80", "sm90"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 5, 77, 261, 1029])
def test_gpu_matches_float64(path, dtype, d, causal, n):
    _skip_unless_runnable(path)
    q, k, v = _make(2, n, 3, d, dtype, layout="fused" if d == 64 else "contiguous", seed=n)
    _check_forward(q, k, v, causal, None, path)


@pytest.mark.gpu
@PROVE
@pytest.mark.parametrize("path", ["sm80", "sm90"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_vit_896px_sequence(path, dtype, d, causal):
    """N = 4101 = 64 * 64 + 5: the last key tile holds 5 keys, the last query tile 5 rows."""
    _skip_unless_runnable(path)
    q, k, v = _make(1, 4101, 2, d, dtype, layout="fused", seed=4101)
    _check_forward(q, k, v, causal, None, path)


@pytest.mark.gpu
@PROVE
@pytest.mark.parametrize("path", ["sm80", "sm90"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal,n", [(True, 77), (False, 77), (False, 261), (True, 261)])
def test_gpu_lengths_mask_keys(path, d, causal, n):
    _skip_unless_runnable(path)
    q, k, v = _make(5, n, 2, d, torch.bfloat16, layout="fused", seed=7)
    lengths = torch.tensor([n, 0, 17, 2**40, 64], device="cuda")  # all, none (o = 0, lse = -inf), some, > N, a tile
    _check_forward(q, k, v, causal, lengths, path)
    _check_forward(q, k, v, causal, torch.tensor([n, 0, 17, 2**31 - 1, 64], device="cuda", dtype=torch.int32), path)


@pytest.mark.gpu
@PROVE
@pytest.mark.parametrize("path", ["sm80", "sm90"])
def test_gpu_masked_keys_are_never_read(path):
    """NaN past each sequence's length must not reach the output: those rows are zero-filled, not loaded."""
    _skip_unless_runnable(path)
    q, k, v = (t.clone() for t in _make(2, 200, 2, 64, torch.float16, seed=8))
    lengths = torch.tensor([70, 131], device="cuda", dtype=torch.int32)
    want = cattn.forward(q, k, v, False, 0.125, lengths, path=path)[:2]
    for t in (k, v):
        t[0, 70:] = float("nan")
        t[1, 131:] = float("nan")
    got = cattn.forward(q, k, v, False, 0.125, lengths, path=path)[:2]
    for a, w in zip(got, want):
        assert torch.equal(a, w)


@pytest.mark.gpu
@PROVE
@pytest.mark.parametrize("path", ["sm80", "sm90"])
@pytest.mark.parametrize("n_q,n_k", [(33, 150), (300, 7), (129, 64)])
def test_gpu_cross_attention(path, n_q, n_k):
    """Nq != Nk (non-causal): the query tail and the key tail fall in different tiles; with and without lengths."""
    _skip_unless_runnable(path)
    g = torch.Generator(device="cuda").manual_seed(n_q)
    q = torch.randn(2, n_q, 3, 64, device="cuda", generator=g).to(torch.float16)
    k, v = (torch.randn(2, n_k, 3, 64, device="cuda", generator=g).to(torch.float16) for _ in range(2))
    _check_forward(q, k, v, False, None, path)
    _check_forward(q, k, v, False, torch.tensor([n_k, 5], device="cuda"), path)


@pytest.mark.gpu
@PROVE
def test_gpu_runs_on_the_tensors_device():
    """Tensors on a GPU other than the current one: the launch must happen on theirs, with their stream."""
    _skip_unless_runnable("sm80")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    q, k, v = (t.to("cuda:1") for t in _make(2, 77, 3, 64, torch.bfloat16, seed=14))
    with torch.cuda.device(0):
        for path in _cuda_paths():
            _check_forward(q, k, v, True, None, path)


@pytest.mark.gpu
@PROVE
def test_gpu_batch_heads_beyond_one_grid_dimension():
    """B * H = 70400 > 65535: the sm80 kernel folds it over two grid dimensions."""
    _skip_unless_runnable("sm80")
    q, k, v = _make(1100, 5, 64, 64, torch.float16, seed=9)
    _check_forward(q, k, v, False, None, "sm80")


@pytest.mark.gpu
@PROVE
def test_gpu_scale_and_misaligned_views():
    """A negative scale, and views whose address or strides are not 16-byte multiples (copied by the wrapper)."""
    _skip_unless_runnable("sm80")
    q, k, v = _make(2, 33, 2, 64, torch.bfloat16, seed=10)
    _check_forward(q, k, v, False, None, "sm80", scale=-0.2)
    wide = torch.randn(2, 33, 2, 72, device="cuda").to(torch.float16)
    q = wide[..., 1:65]  # address and token/head strides not 16-byte multiples
    assert q.data_ptr() % 16 != 0
    _check_forward(q, q, q, True, None, "sm80")


@pytest.mark.gpu
@PROVE
def test_gpu_paths_auto_env_and_errors(monkeypatch):
    _skip_unless_runnable("sm80")
    q, k, v = _make(2, 77, 3, 64, torch.bfloat16, seed=11)
    auto = cattn.forward(q, k, v, True, 0.125)
    assert auto[2] == ("sm90" if "sm90" in _cuda_paths() else "sm80")
    for path in _cuda_paths():
        monkeypatch.setenv(cattn.PATH_ENV_VAR, path)
        o, lse = cattn.attention_forward(q, k, v, True, 0.125)
        want = cattn.forward(q, k, v, True, 0.125, path=path)
        assert torch.equal(o, want[0]) and torch.equal(lse, want[1])
    if "sm90" not in _cuda_paths():
        with pytest.raises(ValueError, match="sm90"):
            cattn.forward(q, k, v, True, 0.125, path="sm90")


def _float64_grads(q, k, v, causal, lengths, go, backend):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = ops.attention(*leaves, causal=causal, lengths=lengths, backend=backend)
    return (out, *torch.autograd.grad(out, leaves, go.to(out.dtype)))


@pytest.mark.gpu
@PROVE
@pytest.mark.parametrize("causal,n,use_lengths", [(True, 77, True), (False, 261, False), (False, 1029, True)])
def test_gpu_cuda_backend_forward_with_triton_backward(causal, n, use_lengths):
    """backend="cuda": this forward, then the Triton backward from its lse: float64 gradients within twice the
    error of PyTorch's SDPA fwd+bwd in bf16."""
    _skip_unless_runnable("sm80")
    b, h, d = 3, 4, 64
    q, k, v = _make(b, n, h, d, torch.bfloat16, layout="fused", seed=12)
    go = torch.randn(b, n, h, d, device="cuda", dtype=torch.float64)
    lengths = torch.tensor([n, 3, n // 2], device="cuda") if use_lengths else None
    want = _float64_grads(q.double(), k.double(), v.double(), causal, lengths, go, "torch")
    got = _float64_grads(q, k, v, causal, lengths, go, "cuda")
    seen = torch.ones(b, dtype=torch.bool, device="cuda") if lengths is None else lengths > 0

    def sdpa(q, k, v):
        return _sdpa(q, k, v, causal, None, lengths)

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    base_out = sdpa(*leaves)
    base = (base_out, *torch.autograd.grad(base_out, leaves, go.to(base_out.dtype)))
    for name, a, e, w in zip(("o", "dq", "dk", "dv"), got, base, want):
        assert a.dtype == torch.bfloat16 and a.isfinite().all(), name
        err = (a.double() - w).abs()[seen].max().item()
        err_torch = (e.double() - w).abs()[seen].max().item()
        assert err <= 2 * err_torch + 1e-3, f"{name}: error {err:.3e} vs SDPA bf16 {err_torch:.3e}"


@pytest.mark.gpu
@PROVE
def test_gpu_opcheck():
    _skip_unless_runnable("sm80")
    from torch.library import opcheck

    q, k, v = (t.requires_grad_() for t in _make(2, 40, 2, 64, torch.float16, seed=13))
    opcheck(torch.ops.dinotxt_fast.attention_fwd.default, (q, k, v, True, 0.125, torch.tensor([40, 9],
            device="cuda"), "cuda"))


_SANITIZER_SCRIPT = r"""
import sys
import torch
from dinotxt_fast.ops.cuda import attention as A

for path in sys.argv[1].split(","):
    for dtype in (torch.float16, torch.bfloat16):
        for d in (64, 128):
            for causal in (False, True):
                q, k, v = torch.randn(2, 70, 3, 3, d, device="cuda").to(dtype).unbind(2)
                lengths = torch.tensor([70, 29], device="cuda")
                A.forward(q, k, v, causal, 0.125, lengths, path=path)
                A.forward(q, k, v, causal, 0.125, None, path=path)
torch.cuda.synchronize()
print("sanitized run finished")
"""


def _sanitizer():
    found = shutil.which("compute-sanitizer")
    nvcc = build_tools.find_nvcc()
    if found is None and nvcc is not None:
        candidate = os.path.join(os.path.dirname(nvcc), "compute-sanitizer")
        found = candidate if os.path.exists(candidate) else None
    return found


_PROBE = "import torch; torch.ones(1, device='cuda').add_(1); torch.cuda.synchronize(); print('sanitizer probe ran')"


@functools.lru_cache(maxsize=None)
def _sanitizer_problem(sanitizer: str, tool: str):
    """Why `sanitizer --tool tool` cannot check kernels here, or None: a trivial CUDA program run under it must come
    back clean. It needs the driver's debugging interface, which some containers and VMs withhold (the sanitizer
    then fails before any kernel of ours runs): that is a skip, not a failure of the kernels."""
    try:
        probe = subprocess.run([sanitizer, "--tool", tool, sys.executable, "-c", _PROBE], capture_output=True,
                               text=True, timeout=300, cwd=REPO)
    except subprocess.TimeoutExpired:
        return "a trivial program did not finish under it within 300 s"
    output = probe.stdout + probe.stderr
    if "sanitizer probe ran" in output and "ERROR SUMMARY: 0 errors" in output:
        return None
    return f"a trivial program fails under it: {' | '.join(output.strip().splitlines()[-3:])[:500]}"


@pytest.mark.gpu
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_gpu_compute_sanitizer(tool):
    _skip_unless_runnable("sm80")
    sanitizer = _sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found (it ships with the CUDA toolkit)")
    problem = _sanitizer_problem(sanitizer, tool)
    if problem is not None:
        pytest.skip(f"compute-sanitizer --tool {tool} cannot check kernels on this machine: {problem}")
    result = subprocess.run([sanitizer, "--tool", tool, sys.executable, "-c", _SANITIZER_SCRIPT,
                             ",".join(_cuda_paths())], capture_output=True, text=True, timeout=900, cwd=REPO)
    output = result.stdout + result.stderr
    assert "sanitized run finished" in output, output[-4000:]
    assert "ERROR SUMMARY: 0 errors" in output, output[-4000:]
