"""Zero-shot classification: the template-ensembled text classifier and ZeroShotClassifier (CPU, tiny model)."""
import pytest
import torch
import torch.nn.functional as F

from dinotxt_fast.inference import SIMPLE_TEMPLATES, ZeroShotClassifier, build_text_classifier
from dinotxt_fast.models.tokenizer import tokenize


def test_text_classifier_matches_hand_computation(tiny):
    names = ["dog", "red {car}", "tree"]
    templates = ["a photo of a {}.", lambda c: f"art of {c}", "{}"]
    tiny.train()
    # batch_size 4 puts prompts of different classes in one batch and splits classes across batches.
    weights = build_text_classifier(tiny, names, templates, batch_size=4)
    assert tiny.training, "the model's training flag must be restored"
    tiny.eval()
    with torch.no_grad():
        expected = []
        for name in names:
            prompts = ["a photo of a " + name + ".", "art of " + name, name]
            emb = F.normalize(tiny.encode_text(tokenize(prompts)).double(), dim=-1)
            expected.append(F.normalize(emb.mean(0), dim=-1))
    assert weights.shape == (3, tiny.config.embed_dim) and weights.dtype == torch.float32
    torch.testing.assert_close(weights.double(), torch.stack(expected), atol=1e-6, rtol=1e-5)


def test_zero_shot_classifier_logits_and_predict(tiny):
    names = ["dog", "cat", "bird", "car"]
    clf = ZeroShotClassifier(tiny, names, templates="simple")
    assert clf.text_embeddings.shape == (4, 128) and clf.num_classes == 4
    images = torch.randn(3, 3, 28, 42)
    with torch.no_grad():
        logits = clf(images)
        img = F.normalize(tiny.encode_image(images), dim=-1)
    expected = tiny.logit_scale.exp() * img @ build_text_classifier(tiny, names, SIMPLE_TEMPLATES).T
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(clf.predict(images), logits.argmax(-1))
    probs, idx = clf.topk(images, k=10)  # k is capped at the class count
    assert probs.shape == idx.shape == (3, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    fixed = ZeroShotClassifier(tiny, names, templates="simple", logit_scale=0.0)
    torch.testing.assert_close(fixed(images), logits / tiny.logit_scale.exp(), atol=1e-5, rtol=1e-5)


def test_zero_shot_bad_inputs(tiny):
    with pytest.raises(ValueError, match="empty"):
        ZeroShotClassifier(tiny, [])
    with pytest.raises(TypeError, match="single string"):
        ZeroShotClassifier(tiny, "dog")
    with pytest.raises(TypeError, match=r"class_names\[1\]"):
        build_text_classifier(tiny, ["dog", 3], "none")
    clf = ZeroShotClassifier(tiny, ["dog"], templates="none")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        clf(torch.randn(3, 28, 28))
    with pytest.raises(TypeError, match="floating point"):
        clf(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
