"""Prompt templates: CLIP's 80 ImageNet ones, the 7-prompt subset, custom lists and their errors."""
import pytest

from dinotxt_fast.inference import IMAGENET_TEMPLATES, SIMPLE_TEMPLATES, resolve_templates


def test_imagenet_templates_are_clips_80():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert IMAGENET_TEMPLATES[35] == "a {} in a video game."
    assert IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert len(SIMPLE_TEMPLATES) == 7 and set(SIMPLE_TEMPLATES) <= set(IMAGENET_TEMPLATES)


def test_resolve_templates():
    assert resolve_templates(None) == IMAGENET_TEMPLATES
    assert resolve_templates("simple") == SIMPLE_TEMPLATES
    assert resolve_templates("none") == ("{}",)
    with pytest.raises(ValueError, match="unknown template set"):
        resolve_templates("imagenet81")
    with pytest.raises(TypeError, match="wrap the single template"):
        resolve_templates("a photo of a {}.")
    with pytest.raises(ValueError, match="exactly one"):
        resolve_templates(["no placeholder"])
    with pytest.raises(ValueError, match="empty"):
        resolve_templates([])
