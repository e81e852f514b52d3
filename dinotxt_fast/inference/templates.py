"""Prompt templates for zero-shot classification and open-vocabulary segmentation.

IMAGENET_TEMPLATES are the 80 prompts OpenAI's CLIP uses for ImageNet zero-shot classification (the CLIP
"Prompt_Engineering_for_ImageNet" notebook; the same list is open_clip's OPENAI_IMAGENET_TEMPLATES), in the same
order. SIMPLE_TEMPLATES is the 7-prompt subset that notebook found to work as well.

Which templates DINO.txt uses: the released code (dinov2 `hub/dinotxt.py` and its README example, the dinov3
`dinotxt` hub entry) ships no template list; its examples encode raw prompts ("photo of dogs") one per class.
Zero-shot ImageNet numbers are reported with the standard CLIP protocol, i.e. ensembling the 80 templates above
(normalise each prompt embedding, average, normalise), which is our default.

A template is either a string with one "{}" placeholder or a callable mapping a class name to the prompt.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

Template = Union[str, Callable[[str], str]]

IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

SIMPLE_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

# Named sets, for the CLI and configs: "none" uses each class name verbatim as its prompt.
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "imagenet": IMAGENET_TEMPLATES,
    "simple": SIMPLE_TEMPLATES,
    "none": ("{}",),
}


def resolve_templates(templates: Union[None, str, Sequence[Template]]) -> tuple[Template, ...]:
    """None -> the 80 ImageNet templates; a name from TEMPLATE_SETS; or a non-empty sequence of templates."""
    if templates is None:
        return IMAGENET_TEMPLATES
    if isinstance(templates, str):
        if templates in TEMPLATE_SETS:
            return TEMPLATE_SETS[templates]
        if "{}" in templates:
            raise TypeError(f"templates must be a sequence of templates; wrap the single template {templates!r} "
                            f"in a list")
        raise ValueError(f"unknown template set {templates!r}; choose from {sorted(TEMPLATE_SETS)} "
                         f"or pass a list of templates")
    templates = tuple(templates)
    if not templates:
        raise ValueError("templates is empty: give at least one template (e.g. '{}' for the bare class name)")
    for t in templates:
        if isinstance(t, str):
            if t.count("{}") != 1:
                raise ValueError(f"template {t!r} must contain exactly one '{{}}' placeholder for the class name")
        elif not callable(t):
            raise TypeError(f"a template must be a str with '{{}}' or a callable, got {type(t).__name__}")
    return templates


def format_prompt(template: Template, class_name: str) -> str:
    """The prompt for one class. Strings use plain substitution, so braces in class names are safe."""
    if isinstance(template, str):
        return template.replace("{}", class_name)
    prompt = template(class_name)
    if not isinstance(prompt, str):
        raise TypeError(f"template callable {template!r} returned {type(prompt).__name__}, expected str")
    return prompt


__all__ = ["IMAGENET_TEMPLATES", "SIMPLE_TEMPLATES", "TEMPLATE_SETS", "Template", "resolve_templates",
           "format_prompt"]
