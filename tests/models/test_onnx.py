"""ONNX export checked with onnxruntime on the CPU (dinotxt_fast/models/onnx_export.py).

Tiny models (vision dim 32, one block each, text context 77). An export takes ~10 s on a 2-core CPU, mostly the
exporter's fixed cost, so each family is exported once.
"""
import numpy as np
import pytest
import torch

import dinotxt_fast as dtf
from dinotxt_fast.models.dinotxt import create_model
from dinotxt_fast.models.onnx_export import CHECK_RTOL, check_onnx, example_ids

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

TINY = dict(vision_dim=32, vision_depth=1, vision_heads=2, pos_embed_grid=4, head_blocks=1, text_dim=32,
            text_layers=1, text_heads=2, context_length=77)


@pytest.fixture(scope="module", params=["dinov2_vitg14_reg4_dinotxt", "dinov3_vitl16_dinotxt"])
def exported(request, tmp_path_factory):
    torch.manual_seed(3)
    model = create_model(request.param, **TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = tmp_path_factory.mktemp("onnx")
    files = dtf.export_onnx(model, out, image_size=4 * model.config.patch_size)
    return model.eval(), out, files


def test_export_matches_pytorch_at_the_export_size_and_another(exported):
    model, out, files = exported
    errors = files["max_relative_error"]
    p = model.config.patch_size
    assert f"image embedding {4 * p}x{4 * p}" in errors and f"image embedding {6 * p}x{p}" in errors
    assert all(err <= CHECK_RTOL for err in errors.values()), errors
    assert files["image_encoder"] == out / "image_encoder.onnx" and files["text_encoder"] == out / "text_encoder.onnx"


def test_graphs_are_plain_onnx_with_dynamic_batch_and_size(exported):
    model, out, _ = exported
    image = onnx.load(out / "image_encoder.onnx")
    text = onnx.load(out / "text_encoder.onnx")
    for graph in (image, text):
        onnx.checker.check_model(graph)
        assert {node.domain for node in graph.graph.node} <= {"", "ai.onnx"}  # no custom-op domain left
    (images,) = image.graph.input
    dims = images.type.tensor_type.shape.dim
    assert dims[1].dim_value == 3 and all(d.dim_param for d in (dims[0], dims[2], dims[3]))
    assert [o.name for o in image.graph.output] == ["image_embedding", "patch_tokens"]
    (ids,) = text.graph.input
    assert ids.type.tensor_type.shape.dim[1].dim_value == 77 and ids.type.tensor_type.shape.dim[0].dim_param
    # One batch size and image size more, straight through onnxruntime.
    session = ort.InferenceSession(str(out / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    p = model.config.patch_size
    x = torch.randn(1, 3, 7 * p, 2 * p)
    embedding, patches = session.run(None, {"images": x.numpy()})
    assert embedding.shape == (1, 64) and patches.shape == (1, 14, 32)
    with torch.no_grad():
        np.testing.assert_allclose(patches, model.image_tokens(x)[1].numpy(), rtol=1e-4, atol=1e-5)
    text_session = ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    ids = example_ids(model, 5, seed=4)
    (got,) = text_session.run(None, {"ids": ids.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model.encode_text(ids).numpy(), rtol=1e-4, atol=1e-5)


def test_check_fails_loudly_when_the_model_changed(exported):
    model, out, _ = exported
    with torch.no_grad():
        model.head.ln_final.bias.add_(1.0)
    try:
        with pytest.raises(RuntimeError, match="differs from the PyTorch model beyond the relative tolerance"):
            check_onnx(model, out, image_size=4 * model.config.patch_size)
    finally:
        with torch.no_grad():
            model.head.ln_final.bias.sub_(1.0)


def test_bad_inputs_are_refused(tmp_path):
    model = create_model("dinov2_vitl14_reg4_dinotxt", **TINY)
    with pytest.raises(TypeError, match="needs a float32 model"):
        dtf.export_onnx(model.to(torch.bfloat16), tmp_path)
    with pytest.raises(ValueError, match="image_size 30 is not a multiple of the patch size 14"):
        dtf.export_onnx(model.float(), tmp_path, image_size=30)
    with pytest.raises(TypeError, match="takes a DinoTxt model"):
        dtf.export_onnx(model.backbone, tmp_path)
