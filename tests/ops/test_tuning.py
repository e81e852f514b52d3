"""The correctness switch DINOTXT_FAST_AUTOTUNE=0 (dinotxt_fast/ops/triton/tuning.py): every autotuned Triton kernel
of every family is declared with a fixed configuration, the switch makes each of them keep exactly that one for the
real shapes' launches, and the fixed configurations themselves compute the right results (run under the CPU
interpreter, which with the switch off runs the GPU's fixed configurations instead of its own small one).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .backends import needs_triton

REPO = Path(__file__).resolve().parents[2]
FAMILIES = ("attention", "contrastive", "dense", "pooling")

pytestmark = needs_triton


def _modules():
    import importlib

    return [importlib.import_module(f"dinotxt_fast.ops.triton.{family}") for family in FAMILIES]


def _autotuners():
    from triton.runtime.autotuner import Autotuner

    return {f"{m.__name__}.{name}": obj for m in _modules() for name, obj in vars(m).items()
            if isinstance(obj, Autotuner)}


def _codegen():
    sys.path.insert(0, str(REPO))
    import tools.triton_codegen as codegen
    return codegen


def test_every_autotuned_kernel_is_declared_with_the_switch():
    from dinotxt_fast.ops.triton.tuning import TUNED

    tuners = _autotuners()
    assert len(tuners) == len(TUNED) == 12, sorted(tuners)
    selects = {id(t.select) for t in TUNED.values()}
    for name, tuner in tuners.items():
        assert id(tuner.early_config_prune) in selects, f"{name} is not declared through tuning.autotune"
    for tuned in TUNED.values():
        assert len(tuned.configs) >= 2 and len(set(map(str, tuned.configs))) == len(tuned.configs), tuned.name


def test_switch_off_keeps_exactly_the_first_kept_configuration_at_the_real_shapes():
    """Every launch the real-shape cases make (tools/triton_codegen.py records them without running anything): with
    autotuning on the kernel's rule keeps its candidates for the arguments; with DINOTXT_FAST_AUTOTUNE=0 only the
    first of those."""
    from dinotxt_fast.ops.triton.tuning import TUNED, autotune_disabled

    codegen = _codegen()
    launches = codegen.record(codegen.all_cases(), ("bfloat16", "float32"))
    by_select = {id(t.select): t for t in TUNED.values()}
    seen = set()
    for launch in launches:
        tuner = codegen._chain(launch.kernel)[0]
        if tuner is None:
            continue
        tuned = by_select[id(tuner.early_config_prune)]
        named = dict(zip(tuner.arg_names, launch.args))
        kept = tuned.select(list(tuned.configs), named, **launch.kwargs)
        with autotune_disabled():
            fixed = tuned.select(list(tuned.configs), named, **launch.kwargs)
        assert len(fixed) == 1 and fixed[0] is kept[0], (tuned.name, launch.case, launch.dtype)
        assert fixed[0] is tuned.fixed(**named, **launch.kwargs)
        seen.add(tuned.name)
    assert seen == set(TUNED), f"no real-shape case launches {sorted(set(TUNED) - seen)}"


def test_switch_fixes_attention_through_its_key():
    """Attention's FIXED_CONFIG argument (deterministic mode) follows the switch too, so the switch changes the
    autotune key (a process can turn it off after tuning)."""
    from dinotxt_fast.ops.triton import attention as A
    from dinotxt_fast.ops.triton.tuning import autotune_disabled, autotune_enabled

    q = torch.zeros(1, 5, 2, 16)
    assert autotune_enabled() and A._common(q, q, q, False, None, q)[0]["FIXED_CONFIG"] == 0
    with autotune_disabled():
        assert not autotune_enabled() and A._common(q, q, q, False, None, q)[0]["FIXED_CONFIG"] == 1
    assert autotune_enabled()


_FIXED_RUN = r"""
import torch
import torch.nn.functional as F
from dinotxt_fast import ops
from dinotxt_fast.inference.segmentation import sliding_window_boxes
from dinotxt_fast.ops.triton import tuning

assert tuning.RUN_GPU_CONFIGS  # the interpreter runs the GPU's fixed configurations
torch.manual_seed(0)

def close(got, want, tol, what):
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= tol * max(1.0, scale), f"{what}: {err:.3e} (scale {scale:.2e})"

def attention(b, n, h, d, dtype, causal, lengths, tol):
    q, k, v = (torch.randn(b, n, h, d, dtype=torch.float64) for _ in range(3))
    go = torch.randn(b, n, h, d, dtype=torch.float64)
    outs = []
    for backend, x in (("torch", torch.float64), ("triton", dtype)):
        t = [a.to(x).requires_grad_() for a in (q, k, v)]
        o = ops.attention(*t, causal=causal, lengths=lengths, backend=backend)
        outs.append((o, *torch.autograd.grad(o, t, go.to(x))))
    for name, got, want in zip(("o", "dq", "dk", "dv"), outs[1], outs[0]):
        close(got, want, tol, f"attention {dtype} N={n} Dh={d} causal={causal} {name}")

# long (ViT-like, N % 64 = 5) and short (text: causal, lengths) problem classes, Dh 64 and 128, fp32 and fp16
attention(1, 261, 2, 64, torch.float32, False, None, 2e-5)
attention(1, 261, 1, 128, torch.float16, False, None, 2e-2)
attention(3, 77, 2, 64, torch.float16, True, torch.tensor([77, 30, 1]), 2e-2)
attention(2, 77, 1, 128, torch.float32, True, torch.tensor([50, 77]), 2e-5)
torch.use_deterministic_algorithms(True)
attention(1, 133, 1, 64, torch.float32, True, None, 2e-5)  # the deterministic dQ pass
torch.use_deterministic_algorithms(False)

for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 1e-2)):  # pooling, D = 1024 (the vision head's width)
    x = torch.randn(3, 1 + 4 + 37, 1024, dtype=torch.float64)
    w, bias = torch.randn(1024, dtype=torch.float64) * 0.5 + 1, torch.randn(1024, dtype=torch.float64)
    g = torch.randn(3, 2048, dtype=torch.float64)
    outs = []
    for backend, xd in (("torch", torch.float64), ("triton", dtype)):
        t = [a.to(xd).requires_grad_() for a in (x, w, bias)]
        o = ops.patch_pool(t[0], num_registers=4, ln_weight=t[1], ln_bias=t[2], normalize=True, backend=backend)
        outs.append((o, *torch.autograd.grad(o, t, g.to(xd))))
    for name, got, want in zip(("out", "dx", "dw", "db"), outs[1], outs[0]):
        close(got, want, tol, f"patch_pool {dtype} {name}")

img, txt = torch.randn(300, 96, dtype=torch.float64), torch.randn(300, 96, dtype=torch.float64)  # contrastive, fp32
outs = []
for backend, xd in (("torch", torch.float64), ("triton", torch.float32)):
    t = [img.to(xd).requires_grad_(), txt.to(xd).requires_grad_(), torch.tensor(2.3, dtype=xd, requires_grad=True)]
    loss = ops.contrastive_loss(*t, backend=backend)
    outs.append((loss, *torch.autograd.grad(loss, t)))
for name, got, want in zip(("loss", "d_img", "d_txt", "d_scale"), outs[1], outs[0]):
    close(got, want, 1e-5, f"contrastive {name}")

patches, text = torch.randn(2, 13, 11, 200, dtype=torch.float64), torch.randn(37, 200, dtype=torch.float64)  # dense
close(ops.patch_text_logits(patches.float(), text.float(), backend="triton"),
      ops.patch_text_logits(patches, text, backend="torch"), 1e-5, "patch_text_logits")
logits = torch.randn(2, 37, 13, 11, dtype=torch.float64)
for softmax in (False, True):
    want = F.interpolate(logits, size=(41, 29), mode="bilinear", align_corners=False)
    want = want.softmax(1) if softmax else want
    labels, scores = ops.upsample_argmax(logits.float(), (41, 29), softmax=softmax, return_scores=True,
                                         backend="triton")
    close(scores, want.max(1).values, 1e-5, f"upsample_argmax softmax={softmax} scores")
    top2 = want.topk(2, dim=1).values
    clear = top2[:, 0] - top2[:, 1] > 1e-5
    assert torch.equal(labels[clear], want.argmax(1)[clear]), "upsample_argmax labels"
boxes = sliding_window_boxes(64, 85, 48, 24)  # 2 x 3 overlapping windows
windows = torch.randn(boxes.shape[0], 21, 7, 7, dtype=torch.float64)
for softmax in (False, True):
    want = ops.slide_decode(windows, boxes, (64, 85), (29, 37), softmax=softmax, return_scores=True, backend="torch")
    got = ops.slide_decode(windows.float(), boxes, (64, 85), (29, 37), softmax=softmax, return_scores=True,
                           backend="triton")
    close(got[1], want[1], 1e-5, f"slide_decode softmax={softmax} scores")
print("fixed configurations: ok")
"""


@pytest.mark.slow
def test_fixed_configurations_compute_the_right_results_under_the_interpreter():
    """The configurations a GPU correctness run uses (benchmarks/gpu_prove.sh), run by the CPU interpreter on small
    odd shapes of every code path against the float64 reference: long and short attention classes (fp32, fp16; Dh
    64 and 128; causal, lengths, the deterministic dQ pass), pooling at D = 1024, the contrastive tiles and GEMMs,
    the dense decoders."""
    env = dict(os.environ, TRITON_INTERPRET="1", DINOTXT_FAST_AUTOTUNE="0", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", _FIXED_RUN], env=env, capture_output=True, text=True, timeout=900,
                          cwd=REPO)
    assert done.returncode == 0 and "fixed configurations: ok" in done.stdout, (done.stdout + done.stderr)[-4000:]
