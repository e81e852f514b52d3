"""What every op family shares: the torch.library registration (opcheck, torch.compile fullgraph), backend selection
and its refusals, the registry the backend packages fill, and the kernels running outside autocast."""
import ast
from pathlib import Path

import pytest
import torch
from torch.library import opcheck

from dinotxt_fast import ops
from dinotxt_fast.ops import dispatch
from dinotxt_fast.ops.reference import attention as ref_attention

OPS_DIR = Path(ops.__file__).resolve().parent


# ----------------------------------------------------------------------------- registration and dispatch
def test_opcheck_all_ops():
    q = torch.randn(2, 5, 2, 8, requires_grad=True)
    k = torch.randn(2, 6, 2, 8, requires_grad=True)
    v = torch.randn(2, 6, 2, 8, requires_grad=True)
    opcheck(torch.ops.dinotxt_fast.attention_fwd.default, (q, k, v, False, 0.3, None, "torch"))
    qkv = torch.randn(2, 5, 3, 2, 8, requires_grad=True)
    opcheck(torch.ops.dinotxt_fast.attention_fwd.default, (*qkv.unbind(2), True, 0.3, None, "torch"))
    opcheck(torch.ops.dinotxt_fast.attention_fwd.default, (*qkv.unbind(2), True, 0.3, torch.tensor([3, 5]), "torch"))
    tokens = torch.randn(3, 11, 16, requires_grad=True)
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    opcheck(torch.ops.dinotxt_fast.patch_pool_fwd.default, (tokens, 4, w, b, 1e-5, True, "torch"))
    opcheck(torch.ops.dinotxt_fast.patch_pool_fwd.default, (tokens, 0, None, None, 1e-5, False, "torch"))
    img, txt = torch.randn(5, 12, requires_grad=True), torch.randn(5, 12, requires_grad=True)
    opcheck(torch.ops.dinotxt_fast.contrastive_fwd.default, (img, txt, torch.tensor(2.0, requires_grad=True), True,
                                                              "torch"))
    opcheck(torch.ops.dinotxt_fast.patch_text_logits.default, (torch.randn(2, 3, 4, 8), torch.randn(5, 8), "torch"))
    opcheck(torch.ops.dinotxt_fast.upsample_argmax.default, (torch.randn(2, 3, 4, 5), [9, 11], True, "torch"))
    boxes = torch.tensor([[0, 0, 6, 6], [0, 4, 6, 10]])
    opcheck(torch.ops.dinotxt_fast.slide_decode.default, (torch.randn(2, 3, 4, 4), boxes, [6, 10], [7, 9], True,
                                                          "torch"))


def test_torch_compile_fullgraph_traces_every_op():
    torch._dynamo.reset()
    qkv = torch.randn(2, 9, 3, 2, 8, requires_grad=True)
    tokens = torch.randn(2, 1 + 4 + 9, 16, requires_grad=True)
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    img, txt = torch.randn(4, 12, requires_grad=True), torch.randn(4, 12, requires_grad=True)
    scale = torch.tensor(1.0, requires_grad=True)

    def step(qkv, tokens, img, txt, scale):
        q, k, v = qkv.unbind(2)
        o = ops.attention(q, k, v, causal=True)
        pooled = ops.patch_pool(tokens, num_registers=4, ln_weight=w, ln_bias=b, normalize=True)
        loss = ops.contrastive_loss(img, txt, scale)
        return o.square().sum() + pooled.sum() + loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = (qkv, tokens, img, txt, scale)
    got = compiled(*args)
    grads = torch.autograd.grad(got, args)
    want = step(*args)
    torch.testing.assert_close(got, want)
    for a, e in zip(grads, torch.autograd.grad(want, args)):
        torch.testing.assert_close(a, e)


def test_dispatch_explicit_env_and_errors(monkeypatch):
    x = torch.randn(1, 3, 1, 4)
    assert dispatch.resolve("attention", None, x) == "torch"
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ops.attention(x, x, x, backend="nope")
    monkeypatch.setenv(ops.ENV_VAR, "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ops.attention(x, x, x)
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    assert ops.attention(x, x, x).shape == x.shape
    monkeypatch.delenv(ops.ENV_VAR)
    report = ops.backends()
    assert report["torch"]["available"] and "attention" in report["torch"]["ops"]
    assert set(report) >= {"torch", "triton", "cuda"}


def test_dispatch_kernel_backend_needs_cuda_or_the_interpreter(monkeypatch):
    calls = []

    def fwd(q, k, v, causal, scale, lengths):
        calls.append(q.device.type)
        return ref_attention.attention_forward(q, k, v, causal, scale, lengths)

    saved = dispatch.registered().get("triton")
    ops.register_backend(ops.Backend("triton", {"attention_forward": fwd,
                                                "attention_backward": ref_attention.attention_backward}))
    try:
        x = torch.randn(1, 3, 1, 4)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            ops.attention(x, x, x, backend="triton")
        with pytest.raises(ValueError, match="no patch_pool kernel"):
            ops.patch_pool(torch.randn(1, 3, 4), num_registers=0, backend="triton")
        assert dispatch.resolve("attention", None, x) == "torch"  # auto on CPU is always the reference
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        ops.attention(x, x, x, backend="triton")
        assert calls == ["cpu"]
        with pytest.raises(ValueError, match="registers"):
            ops.register_backend(ops.Backend("half", {"attention_forward": fwd}))
    finally:
        if saved is None:
            dispatch._REGISTRY.pop("triton", None)
        else:
            ops.register_backend(saved)


def test_ops_run_their_kernels_outside_autocast():
    """Inside an autocast region the kernels still compute in the dtypes they are given (and declare)."""
    img, txt = torch.randn(9, 16), torch.randn(9, 16)
    want = ops.contrastive_loss(img, txt, torch.tensor(2.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ops.contrastive_loss(img, txt, torch.tensor(2.0))
        logits = ops.patch_text_logits(torch.randn(1, 2, 3, 16), torch.randn(4, 16))
    torch.testing.assert_close(got, want)
    assert logits.dtype == torch.float32


# ------------------------------------------------------------------------------- one registration style
def test_every_backend_provides_whole_declared_families():
    """The families are declared once (library.py); the torch backend registers all of them, like the kernel
    backends, through add_kernels; a backend never holds part of a family."""
    assert set(dispatch.FAMILIES) == {"attention", "patch_pool", "contrastive_loss", "patch_text_logits",
                                      "upsample_argmax", "slide_decode"}
    torch_backend = dispatch.registered()["torch"]
    assert torch_backend.families() == list(dispatch.FAMILIES)
    for backend in dispatch.registered().values():
        for family, names in dispatch.FAMILIES.items():
            present = [n for n in names if n in backend.kernels]
            assert present in ([], list(names)), (backend.name, family, present)
    assert set(dispatch.AUTO_ORDER) == set(dispatch.FAMILIES)
    assert set(dispatch.MATCH_KEYS) <= set(dispatch.FAMILIES)


def test_add_kernels_refuses_unknown_families_and_partial_kernel_sets():
    with pytest.raises(ValueError, match="unknown op family 'nope'"):
        ops.add_kernels("test-backend", "nope", {"nope": lambda: None})
    with pytest.raises(ValueError, match=r"needs exactly the kernels \('attention_forward', 'attention_backward'\)"):
        ops.add_kernels("test-backend", "attention", {"attention_forward": lambda: None})
    assert "test-backend" not in dispatch.registered()


def test_a_declared_backend_without_kernels_has_none_in_this_build(monkeypatch):
    monkeypatch.setitem(dispatch._REGISTRY, "cuda", dispatch.Backend("cuda", {}))
    x = torch.randn(1, 3, 1, 4)
    with pytest.raises(ValueError, match="backend 'cuda' has no kernels in this build"):
        ops.attention(x, x, x, backend="cuda")
    assert ops.backends()["cuda"] == {"available": False, "reason": "no kernels for this backend in this build",
                                      "ops": []}


def _imported_modules(path: Path) -> set:
    """Absolute names of the dinotxt_fast.ops modules that `path` imports (relative imports resolved)."""
    package = ["dinotxt_fast"] + list(path.relative_to(OPS_DIR.parent).parts[:-1])  # e.g. dinotxt_fast.ops.cuda
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("backend,other", [("triton", "cuda"), ("cuda", "triton"), ("reference", "triton"),
                                           ("reference", "cuda")])
def test_backend_packages_never_import_each_other(backend, other):
    """Host helpers shared by several backends live in planning.py / contrastive_tiles.py; the "cuda" attention
    finds the Triton backward through the dispatch at call time."""
    for path in sorted((OPS_DIR / backend).glob("*.py")):
        crossing = {name for name in _imported_modules(path) if name.startswith(f"dinotxt_fast.ops.{other}")}
        assert not crossing, f"{path.relative_to(OPS_DIR)} imports {sorted(crossing)}"
