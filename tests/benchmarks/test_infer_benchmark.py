"""benchmarks/infer.py: the CPU smoke run (a tiny model, Triton through the interpreter) writes a schema-2 record
with the measured ceilings, rows for ours and the reference, throughput and the checks against the reference."""
import importlib
import json
import os

import pytest
import torch


@pytest.fixture
def infer_bench(monkeypatch):
    import dinotxt_fast  # noqa: F401 - Triton kernels decorated under this session's setting (conftest), not ours

    # main() sets TRITON_INTERPRET for --device cpu; keep that out of the other tests' environment.
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    return importlib.import_module("benchmarks.infer")  # as the suite runner imports it


def test_infer_cpu_smoke_run(tmp_path, infer_bench):
    from dinotxt_fast.ops import dispatch

    env_before, order_before = os.environ.get(dispatch.ENV_VAR), dict(dispatch.AUTO_ORDER)
    assert infer_bench.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    assert os.environ.get(dispatch.ENV_VAR) == env_before and dispatch.AUTO_ORDER == order_before  # routing undone
    (path,) = tmp_path.glob("infer-cpu-*.json")
    record = json.loads(path.read_text())
    assert record["benchmark"] == "infer" and record["schema"] == 2
    assert record["ceilings"]["matmul_tflops"] > 0 and record["ceilings"]["copy_gbps"] > 0
    assert record["settings"]["quick"] and record["settings"]["model_overrides"] and "target" in record["notes"]
    rows = {(r["case"], r["impl"], r["pass"]): r for r in record["results"]}
    # Triton runs on CPU tensors only where its kernels were imported under the interpreter (not on a GPU machine).
    triton_here = not torch.cuda.is_available()
    for case, pass_, unit in (("tiny slide C=5 28x42", "slide", "images_per_s"),
                              ("tiny zero-shot", "images", "images_per_s"),
                              ("tiny zero-shot", "prompts", "prompts_per_s")):
        reference = rows[(case, infer_bench.REFERENCE, pass_)]
        assert reference[unit] > 0 and reference["tflops"] > 0 and reference["max_abs_diff"] == 0.0
        assert rows[(case, infer_bench.SDPA, pass_)][unit] > 0
        assert "skipped" in rows[(case, "ours (cuda)", pass_)]  # no CUDA tensors in a CPU run: recorded, not fatal
        assert "skipped" in rows[(case, "ours (auto)", pass_)]
        ours = rows[(case, "ours (triton)", pass_)]
        if triton_here:
            assert ours[unit] > 0 and ours["routing"] == "triton > torch"
            assert ours["speedup_vs_reference"] > 0 and ours["best_baseline"]
            assert ours["max_abs_diff"] < 1e-4
            assert "attention" in ours["backends_used"]  # what ran, recorded by the benchmark, not assumed
            assert {name for names in ours["backends_used"].values() for name in names} == {"triton"}
    if triton_here:
        assert rows[("tiny slide C=5 28x42", "ours (triton)", "slide")]["pixel_agreement"] == 1.0
        assert rows[("tiny zero-shot", "ours (triton)", "images")]["top1_agreement"] == 1.0
        assert rows[("tiny zero-shot", "ours (triton)", "images")]["backends_used"]["patch_pool"] == ["triton"]
    # the eager full-resolution decode written in the benchmark agrees with dtf.segment's banded torch decode
    segment_torch = rows[("tiny slide C=5 28x42", infer_bench.SEGMENT_TORCH, "slide")]
    assert segment_torch["pixel_agreement"] == 1.0 and segment_torch["max_abs_diff"] < 1e-5


def test_infer_list_and_bad_arguments(infer_bench, capsys):
    assert infer_bench.main(["--device", "cpu", "--quick", "--list"]) == 0
    out = capsys.readouterr().out
    assert "segment" in out and "zeroshot" in out
    with pytest.raises(SystemExit):
        infer_bench.main(["--device", "cpu", "--parts", "segment,nope"])
    with pytest.raises(SystemExit):
        infer_bench.main(["--device", "cpu", "--quick", "--preset", "nope", "--parts", "segment"])


def test_routing_on_cuda_sets_and_restores_the_auto_order(infer_bench, monkeypatch):
    """The CUDA branch of the routing (no GPU needed: it only edits the dispatch tables), which never writes the
    environment: a DINOTXT_FAST_BACKEND there would override the auto order, so it is refused."""
    from benchmarks import harness
    from dinotxt_fast import ops
    from dinotxt_fast.ops import dispatch

    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    order_before, attention_before = dict(dispatch.AUTO_ORDER), ops.attention
    measured_before = dispatch.measured_choice
    with ops.use_backend("triton"), infer_bench.routed(("cuda", "triton"), torch.device("cuda"), sdpa=True):
        assert all(order == ("cuda", "triton", "torch") for order in dispatch.AUTO_ORDER.values())
        assert dispatch.measured_choice is not measured_before  # the measured table is set aside
        assert dispatch.measured_choice("attention", torch.zeros(1), {}, gpu="any") is None
        assert ops.attention is harness.sdpa_attention
        # the enclosing use_backend("triton") is scoped out: an op resolves as auto does (CPU tensors: torch)
        assert dispatch.resolve("attention", None, torch.zeros(1)) == "torch"
    assert dispatch.AUTO_ORDER == order_before and ops.attention is attention_before
    assert dispatch.measured_choice is measured_before
    with pytest.raises(RuntimeError, match="inside"), infer_bench.routed(("triton",), torch.device("cuda")):
        raise RuntimeError("inside")
    assert dispatch.AUTO_ORDER == order_before
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    with pytest.raises(RuntimeError, match=dispatch.ENV_VAR), infer_bench.routed(("triton",), torch.device("cuda")):
        raise AssertionError("the routing ran under DINOTXT_FAST_BACKEND")
    assert os.environ[dispatch.ENV_VAR] == "torch" and dispatch.AUTO_ORDER == order_before
    with infer_bench.routed(("torch",), torch.device("cuda")):  # the reference rows: a scoped torch choice
        assert dispatch.AUTO_ORDER == order_before


def test_flop_counts_match_the_model_layers(infer_bench):
    """vision_flops / text_flops against the model's own Linear layers (2 * in * out per token) plus attention."""
    from torch import nn

    model = infer_bench.build_model(infer_bench.PRESET, infer_bench.TINY_MODEL, torch.device("cpu"), torch.float32)
    cfg = model.config

    def linear_macs(modules):
        return sum(m.in_features * m.out_features for mod in modules for m in mod.modules() if isinstance(m, nn.Linear))

    grid = (2, 3)
    tokens = 1 + cfg.num_register_tokens + grid[0] * grid[1]
    blocks = list(model.backbone.blocks) + list(model.head.blocks)
    want = (2 * tokens * linear_macs(blocks) + len(blocks) * 4 * tokens**2 * cfg.vision_dim
            + 2 * grid[0] * grid[1] * 3 * cfg.patch_size**2 * cfg.vision_dim)
    assert infer_bench.vision_flops(cfg, grid[0] * cfg.patch_size, grid[1] * cfg.patch_size) == want
    batch, length = 5, 9
    want = (2 * batch * length * linear_macs(model.text.backbone.blocks)
            + cfg.text_layers * 2 * batch * length**2 * cfg.text_dim + 2 * batch * cfg.text_dim * cfg.embed_dim)
    assert infer_bench.text_flops(cfg, batch, length) == want
