"""The dense decoding family (patch_text_logits, upsample_argmax, slide_decode): the reference (torch backend) against
float64 oracles to 1e-12 in bands of rows, and every backend (Triton under the CPU interpreter here, GPU when present;
CUDA on a GPU only) against float64 full-resolution oracles built with F.interpolate.

Labels must equal the oracle's argmax wherever its top-2 margin exceeds rounding; scores must match the oracle's
top value. Every output and workspace the kernels allocate is poisoned first (NaN, or -1 for labels; the poison
fixture, for every test here).
"""
import pytest
import torch
import torch.nn.functional as F

from dinotxt_fast import ops
from dinotxt_fast.inference.segmentation import segment, sliding_window_boxes
from dinotxt_fast.models.dinotxt import create_model
from dinotxt_fast.ops.reference import common

from .backends import PROVE, TORCH_AND_TRITON, needs_triton, proving, require

pytestmark = pytest.mark.usefixtures("poison")


def cosine_oracle(patches, text):
    return torch.einsum("bhwd,cd->bchw", F.normalize(patches.double(), dim=-1), F.normalize(text.double(), dim=-1))


def upsample_oracle(logits, size, softmax):
    full = F.interpolate(logits.double(), size=size, mode="bilinear", align_corners=False)
    return full.softmax(1) if softmax else full


def slide_oracle(window_logits, boxes, canvas, size, softmax):
    """[C, H, W] float64: each window bilinear to its box, (softmax), overlap average, bilinear to `size`."""
    c, device = window_logits.shape[1], window_logits.device
    acc = torch.zeros(c, *canvas, dtype=torch.float64, device=device)
    count = torch.zeros(canvas, dtype=torch.float64, device=device)
    for logits, (y0, x0, y1, x1) in zip(window_logits.double(), boxes):
        up = F.interpolate(logits[None], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)[0]
        acc[:, y0:y1, x0:x1] += up.softmax(0) if softmax else up
        count[y0:y1, x0:x1] += 1
    return F.interpolate((acc / count)[None], size=size, mode="bilinear", align_corners=False)[0]


def check_decoded(labels, scores, full, dim, margin=1e-5, atol=2e-6):
    """labels/scores vs a float64 map `full` whose class axis is `dim`."""
    full = full.to(labels.device)
    top = full.topk(min(2, full.shape[dim]), dim=dim).values
    first = top.select(dim, 0)
    clear = (first - top.select(dim, -1) > margin) if full.shape[dim] > 1 else torch.ones_like(first, dtype=bool)
    assert labels.dtype == torch.int64 and scores.dtype == torch.float32
    assert labels.shape == first.shape and scores.shape == first.shape
    assert int(labels.min()) >= 0 and int(labels.max()) < full.shape[dim]  # every label written
    assert float(clear.double().mean()) > 0.98
    assert torch.equal(labels[clear], full.argmax(dim)[clear])
    torch.testing.assert_close(scores.double(), first, rtol=1e-5, atol=atol)


# ------------------------------------------------------------------ reference (torch backend), float64
def test_patch_text_logits_is_cosine():
    patches, text = torch.randn(2, 3, 5, 12, dtype=torch.float64), torch.randn(4, 12, dtype=torch.float64)
    want = torch.einsum("bhwd,cd->bchw", F.normalize(patches, dim=-1), F.normalize(text, dim=-1))
    torch.testing.assert_close(ops.patch_text_logits(patches, text), want)
    with pytest.raises(ValueError, match="share D"):
        ops.patch_text_logits(patches, text[:, :5])


@pytest.mark.parametrize("c,h,w,size", [(1, 3, 4, (7, 9)), (3, 5, 7, (37, 50)), (150, 4, 6, (29, 31)),
                                        (3, 8, 8, (5, 6))])
@pytest.mark.parametrize("softmax", [False, True])
def test_upsample_argmax_matches_interpolate(c, h, w, size, softmax, monkeypatch):
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", c * size[1] * 3)  # bands of 3 rows (one image at a time)
    logits = torch.randn(2, c, h, w, dtype=torch.float64)
    full = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    if softmax:
        full = full.softmax(1)
    labels, scores = ops.upsample_argmax(logits, size, softmax=softmax, return_scores=True)
    assert labels.shape == (2, *size) and labels.dtype == torch.int64
    torch.testing.assert_close(scores, full.max(1).values, rtol=1e-12, atol=1e-12)
    assert torch.equal(labels, full.argmax(1))


@pytest.mark.parametrize("softmax", [True, False])
def test_slide_decode_matches_full_resolution_protocol(softmax, monkeypatch):
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 4000)  # many bands
    canvas, c = (50, 71), 5
    boxes = [(0, 0, 30, 30), (0, 20, 30, 50), (0, 41, 30, 71), (20, 0, 50, 30), (20, 20, 50, 50), (20, 41, 50, 71)]
    window_logits = torch.randn(len(boxes), c, 4, 4, dtype=torch.float64)
    for size in ((50, 71), (77, 101), (33, 40), (7, 9)):  # (7, 9): the resize reads scattered canvas rows
        labels, scores = ops.slide_decode(window_logits, boxes, canvas, size, softmax=softmax, return_scores=True)
        full = slide_oracle(window_logits, boxes, canvas, size, softmax)
        want_labels, want_scores = full.argmax(0), full.max(0).values
        torch.testing.assert_close(scores, want_scores, rtol=1e-12, atol=1e-12)
        assert torch.equal(labels, want_labels)


def test_reference_labels_equal_the_full_resolution_maps_in_fp32():
    """The torch backend at the ADE20K shapes against the naive fp32 expressions it replaces: the same labels (its
    taps are computed as F.interpolate computes them in fp32; labels are the first maximum of the logits, the
    softmax being monotone), scores to fp32 rounding."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 150, 37, 49, generator=g) * 0.1
    full = F.interpolate(logits, size=(512, 683), mode="bilinear", align_corners=False)
    for softmax in (False, True):
        want = full.softmax(1) if softmax else full
        labels, scores = ops.upsample_argmax(logits, (512, 683), softmax=softmax, return_scores=True, backend="torch")
        assert float((labels == want.argmax(1)).double().mean()) >= 0.99999
        torch.testing.assert_close(scores, want.max(1).values, rtol=1e-5, atol=1e-7)
    boxes = sliding_window_boxes(512, 683, 384, 192)
    windows = torch.randn(len(boxes), 21, 28, 28, generator=g) * 0.1  # the official grid, fewer classes
    for size in ((512, 683), (480, 640)):
        acc, count = torch.zeros(21, 512, 683), torch.zeros(512, 683)
        for lg, (y0, x0, y1, x1) in zip(windows, boxes.tolist()):
            acc[:, y0:y1, x0:x1] += F.interpolate(lg[None], size=(y1 - y0, x1 - x0), mode="bilinear",
                                                  align_corners=False)[0].softmax(0)
            count[y0:y1, x0:x1] += 1
        want = F.interpolate((acc / count)[None], size=size, mode="bilinear", align_corners=False)[0]
        labels, scores = ops.slide_decode(windows, boxes, (512, 683), size, return_scores=True, backend="torch")
        assert float((labels == want.argmax(0)).double().mean()) >= 0.99999
        torch.testing.assert_close(scores, want.max(0).values, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("band_rows", [1, 2, 5])
def test_reference_bands_and_row_blocks_do_not_change_the_result(band_rows, monkeypatch):
    """Bands of 1, 2 and 5 output rows (the kept block of width-resized source rows refilled as bands move on):
    the same float64 result as one band, upsampling and downsampling, windows of two sizes."""
    logits = torch.randn(2, 7, 5, 6, dtype=torch.float64)
    boxes, canvas = [(0, 0, 12, 15), (0, 9, 12, 26), (8, 0, 20, 14), (5, 11, 20, 26)], (20, 26)
    windows = torch.randn(4, 7, 3, 4, dtype=torch.float64)
    whole = [ops.upsample_argmax(logits, (23, 17), softmax=True, return_scores=True)]
    whole += [ops.slide_decode(windows, boxes, canvas, size, return_scores=True) for size in ((31, 40), (6, 9))]
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 7 * 40 * band_rows)
    banded = [ops.upsample_argmax(logits, (23, 17), softmax=True, return_scores=True)]
    banded += [ops.slide_decode(windows, boxes, canvas, size, return_scores=True) for size in ((31, 40), (6, 9))]
    for (labels, scores), (want_labels, want_scores) in zip(banded, whole):
        assert torch.equal(labels, want_labels)
        torch.testing.assert_close(scores, want_scores, rtol=1e-13, atol=1e-15)


def test_slide_decode_errors():
    logits = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="cover"):
        ops.slide_decode(logits, [(0, 0, 10, 10)], (10, 12), (10, 12))
    with pytest.raises(ValueError, match="inside the canvas"):
        ops.slide_decode(logits, [(0, 0, 11, 10)], (10, 10), (10, 10))
    with pytest.raises(ValueError, match=r"boxes must be \[1, 4\]"):
        ops.slide_decode(logits, [(0, 0, 10, 10), (0, 0, 10, 10)], (10, 10), (10, 10))


# ------------------------------------------------------------------- every backend on CPU (Triton: interpreter)
@pytest.mark.parametrize("b,h,w,d,c", [(2, 3, 5, 24, 1), (1, 7, 9, 100, 150), (3, 4, 4, 64, 3)])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                    (torch.float16, torch.float32)])
@pytest.mark.parametrize("backend", TORCH_AND_TRITON)
def test_patch_text_logits(backend, b, h, w, d, c, dtypes):
    patches = torch.randn(b, h, w, d).to(dtypes[0])
    text = torch.randn(c, d).to(dtypes[1])
    got = ops.patch_text_logits(patches, text, backend=backend)
    want = cosine_oracle(patches, text)
    assert got.dtype == torch.float32 and got.shape == (b, c, h, w) and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", TORCH_AND_TRITON)
def test_patch_text_logits_strided_and_zero_rows(backend):
    tokens = torch.randn(2, 1 + 4 + 3 * 5, 24)  # [B, 1+R+P, D]: the patch part is a strided view
    patches = tokens[:, 5:].reshape(2, 3, 5, 24)
    text = torch.randn(24, 7).T  # unit stride along C, not D
    patches[0, 1, 2] = 0  # a zero vector has cosine 0 (F.normalize's clamp)
    got = ops.patch_text_logits(patches, text, backend=backend)
    torch.testing.assert_close(got.double(), cosine_oracle(patches, text), rtol=0, atol=1e-6)
    assert bool((got[0, :, 1, 2] == 0).all())


@pytest.mark.parametrize("c,h,w,size", [(1, 3, 4, (7, 9)), (3, 5, 7, (37, 50)), (150, 4, 6, (29, 31)),
                                        (3, 8, 8, (5, 6)), (5, 1, 1, (3, 4)), (4, 6, 1, (13, 1))])
@pytest.mark.parametrize("softmax", [False, True])
@pytest.mark.parametrize("backend", TORCH_AND_TRITON)
def test_upsample_argmax(backend, c, h, w, size, softmax):
    logits = torch.randn(2, c, h, w)
    labels, scores = ops.upsample_argmax(logits, size, softmax=softmax, return_scores=True, backend=backend)
    check_decoded(labels, scores, upsample_oracle(logits, size, softmax), dim=1)


@pytest.mark.parametrize("backend", TORCH_AND_TRITON)
def test_upsample_argmax_strided_fp16_and_ties(backend):
    logits = torch.randn(2, 9, 6, 5).to(torch.float16)[:, ::2]  # classes strided
    labels, scores = ops.upsample_argmax(logits, (11, 13), return_scores=True, backend=backend)
    check_decoded(labels, scores, upsample_oracle(logits, (11, 13), False), dim=1)
    tied = torch.zeros(1, 40, 2, 3)
    tied[:, 17] = tied[:, 33] = 1.0  # exact ties: the lowest class wins, like torch.max
    assert bool((ops.upsample_argmax(tied, (5, 7), backend=backend) == 17).all())


SLIDE_CASES = {
    # canvas, boxes: the mmseg grid (overlaps of 1, 2 and 4 windows), and hand-made uneven boxes
    "grid": ((23, 31), sliding_window_boxes(23, 31, 12, 7).tolist()),
    "uneven": ((20, 26), [(0, 0, 12, 15), (0, 9, 12, 26), (8, 0, 20, 14), (5, 11, 20, 26)]),
}


@pytest.mark.parametrize("case", sorted(SLIDE_CASES))
@pytest.mark.parametrize("c", [1, 3, 150])
@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("backend", TORCH_AND_TRITON)
def test_slide_decode(backend, case, c, softmax):
    canvas, boxes = SLIDE_CASES[case]
    window_logits = torch.randn(len(boxes), c, 3, 4) * 2
    # identity, upsampling and downsampling final resizes, none of them multiples of the canvas
    sizes = [canvas, (37, 45), (11, 17)] if c < 150 else [(37, 45)]
    for size in sizes:
        labels, scores = ops.slide_decode(window_logits, boxes, canvas, size, softmax=softmax, return_scores=True,
                                          backend=backend)
        check_decoded(labels, scores, slide_oracle(window_logits, boxes, canvas, size, softmax), dim=0)


@pytest.mark.parametrize("backend", TORCH_AND_TRITON)
def test_slide_decode_fp16_strided_and_single_window(backend):
    canvas, boxes = SLIDE_CASES["grid"]
    window_logits = torch.randn(len(boxes), 10, 3, 8).to(torch.float16)[:, :, :, ::2]
    labels, scores = ops.slide_decode(window_logits, boxes, canvas, (29, 40), return_scores=True, backend=backend)
    check_decoded(labels, scores, slide_oracle(window_logits, boxes, canvas, (29, 40), True), dim=0)
    whole = torch.randn(1, 4, 5, 6)  # "whole" mode: one window, no softmax == upsample_argmax
    labels, scores = ops.slide_decode(whole, [(0, 0, 19, 22)], (19, 22), (19, 22), softmax=False,
                                      return_scores=True, backend=backend)
    want_labels, want_scores = ops.upsample_argmax(whole, (19, 22), return_scores=True, backend=backend)
    assert torch.equal(labels, want_labels[0])
    torch.testing.assert_close(scores, want_scores[0], rtol=1e-6, atol=1e-6)


@needs_triton
def test_triton_slide_decode_coverage_errors_match_reference():
    logits = torch.randn(1, 3, 4, 4)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="cover"):
            ops.slide_decode(logits, [(0, 0, 10, 10)], (10, 12), (10, 12), backend=backend)
    # a canvas row the final (downsampling) resize never reads may stay uncovered, as in the reference
    logits = torch.randn(2, 3, 4, 4)
    boxes, canvas, size = [(0, 0, 4, 8), (5, 0, 9, 8)], (9, 8), (2, 8)
    want = ops.slide_decode(logits, boxes, canvas, size, backend="torch")
    assert torch.equal(ops.slide_decode(logits, boxes, canvas, size, backend="triton"), want)
    with pytest.raises(ValueError, match="cover"):
        ops.slide_decode(logits, boxes, canvas, (9, 8), backend="triton")


def test_window_table_is_made_once_per_geometry_and_device():
    """slide_decode's window table goes to the device once per (boxes, canvas, size): a segmentation run calls it
    per image with the same geometry, and a fresh table would be a host-to-device copy and a sync each time."""
    from dinotxt_fast.ops.planning import device_window_table, window_table

    boxes = sliding_window_boxes(512, 683, 384, 192)
    first = device_window_table(boxes, (512, 683), (512, 683), "cpu")
    again = device_window_table(boxes.tolist(), [512, 683], (512, 683), torch.device("cpu"))
    assert again[0] is first[0]  # the same tensor: made once
    table, total, largest = first
    assert table.dtype == torch.int32 and table.shape == (6, 5) and table.device.type == "cpu"
    assert (table.tolist(), total, largest) == window_table(boxes, (512, 683), (512, 683))
    assert device_window_table(boxes, (512, 683), (256, 342), "cpu")[0] is not table  # another geometry


@needs_triton
def test_triton_dense_rejects_what_it_cannot_run():
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        ops.upsample_argmax(x, (8, 8), backend="triton")
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        ops.slide_decode(x, [(0, 0, 8, 8)], (8, 8), (8, 8), backend="triton")
    with pytest.raises(ValueError, match="exceeds 32767"):
        ops.upsample_argmax(x.float(), (4, 40000), backend="triton")
    with pytest.raises(ValueError, match="non-empty"):
        ops.patch_text_logits(torch.randn(1, 2, 2, 4), torch.randn(0, 4), backend="triton")


TINY = dict(vision_dim=64, vision_depth=2, vision_heads=4, pos_embed_grid=4, text_dim=64, text_layers=2,
            text_heads=4)


@needs_triton
@pytest.mark.parametrize("mode", ["slide", "whole"])
def test_segment_backend_is_passed_to_the_decoding_ops(mode):
    torch.manual_seed(0)
    model = create_model("dinov2_vitl14_reg4_dinotxt", **TINY).eval()
    image = torch.randn(1, 3, 37, 50)
    text = torch.randn(5, model.config.embed_dim)
    kw = dict(mode=mode, short_side=None, window=28, stride=14, return_scores=True)
    want_labels, want_scores = segment(model, image, text, backend="torch", **kw)
    labels, scores = segment(model, image, text, backend="triton", **kw)
    assert torch.equal(labels, want_labels)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        segment(model, image, text, backend="nope", **kw)


# ------------------------------------------------------------------------------------------------------ GPU
def _ade_like_windows(classes, dtype, grid=28):
    """Window logits of the official slide protocol on a 512x683 canvas: 384 windows, stride 192, 28x28 patches
    (392 / 14), cosines of random unit vectors scaled like real ones."""
    boxes = sliding_window_boxes(512, 683, 384, 192)
    patches = torch.randn(len(boxes), grid, grid, 1024, device="cuda")
    text = torch.randn(classes, 1024, device="cuda")
    return ops.patch_text_logits(patches, text, backend="torch").mul(8).to(dtype), boxes


@pytest.mark.gpu
@PROVE
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_patch_text_logits_bf16_real_shapes(backend):
    require(backend, "patch_text_logits")
    patches = torch.randn(6, 28, 28, 1024, device="cuda", dtype=torch.bfloat16)
    for text in (torch.randn(150, 1024, device="cuda", dtype=torch.bfloat16),
                 torch.randn(150, 1024, device="cuda")):  # segment() passes fp32 text with bf16 patches
        want = cosine_oracle(patches, text)
        got = ops.patch_text_logits(patches, text, backend=backend)
        torch_lowp = torch.einsum("bhwd,cd->bchw", F.normalize(patches, dim=-1),
                                  F.normalize(text.to(patches.dtype), dim=-1))
        assert (got.double() - want).abs().max() <= 2 * (torch_lowp.double() - want).abs().max()
        assert (got.double() - want).abs().max() < 1e-5  # fp32 accumulation of exact bf16 products


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [proving(torch.float32), proving(torch.float16), torch.bfloat16])
def test_gpu_upsample_argmax_odd_shapes(backend, dtype):
    require(backend, "upsample_argmax")
    for c, h, w, size in ((1, 3, 4, (7, 9)), (150, 37, 49, (512, 683)), (19, 73, 146, (1024, 2048)),
                          (1000, 16, 21, (220, 301))):
        logits = torch.randn(3, c, h, w, device="cuda").to(dtype)
        for softmax in (False, True):
            labels, scores = ops.upsample_argmax(logits, size, softmax=softmax, return_scores=True, backend=backend)
            full = upsample_oracle(logits, size, softmax)
            check_decoded(labels, scores, full, dim=1)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("classes,size", [proving(150, (512, 683)), (19, (1024, 1366)), (1000, (300, 401))])
def test_gpu_slide_decode_official_protocol(backend, classes, size):
    """The official windows on a 512x683 canvas, decoded at the canvas size, upsampled 2x and downsampled:
    >= 99.99% pixel agreement with the full-resolution protocol, exact where the margin exceeds rounding, and no
    memory proportional to the class count (only the outputs and one float per window-box pixel)."""
    require(backend, "slide_decode")
    window_logits, boxes = _ade_like_windows(classes, torch.float32)
    full = slide_oracle(window_logits, boxes.tolist(), (512, 683), size, True)  # on the GPU, float64
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    labels, scores = ops.slide_decode(window_logits, boxes, (512, 683), size, return_scores=True, backend=backend)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - start
    check_decoded(labels, scores, full, dim=0, margin=1e-6, atol=1e-6)
    assert float((labels.cpu() == full.argmax(0)).double().mean()) >= 0.9999
    box_pixels = sum((y1 - y0) * (x1 - x0) for y0, x0, y1, x1 in boxes.tolist())
    assert extra <= 12 * size[0] * size[1] + 4 * box_pixels + (1 << 20)


@pytest.mark.gpu
@PROVE
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_slide_decode_bf16_logits_and_whole_mode(backend):
    require(backend, "slide_decode")
    window_logits, boxes = _ade_like_windows(150, torch.bfloat16)
    for softmax in (True, False):
        labels, scores = ops.slide_decode(window_logits, boxes, (512, 683), (512, 683), softmax=softmax,
                                          return_scores=True, backend=backend)
        check_decoded(labels, scores, slide_oracle(window_logits, boxes.tolist(), (512, 683), (512, 683), softmax),
                      dim=0, margin=1e-5, atol=2e-6)
