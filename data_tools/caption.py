"""Caption images with a vision-language model through ``transformers.pipeline`` (DCPO-c, arXiv 2502.06023).

DCPO captions each image of a pair with a VLM given the shared prompt (LLaVA-v1.6-34B, Emu2); its captioning prompt
is not released, so the template is **our** choice and configurable: ``{prompt}`` in ``--template`` is replaced by
the pair's ``caption``. transformers 5 has only the ``image-text-to-text`` pipeline (``image-to-text`` was removed
after 4.x); :data:`DEFAULT_TASK` is whichever of the two the installed version supports.

Prompting: when the model's processor has a chat template the prompt is sent as one user turn
``[image, text]``; otherwise (BLIP, GIT, ...) the text is a plain prefix. Only the generated continuation is kept
(``return_full_text=False``), whitespace-stripped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from diffalign.plugins import check_name, load_plugins

DEFAULT_TEMPLATE = "Describe this image in one sentence. The image was generated from the prompt: {prompt}"


def supported_tasks() -> list[str]:
    """The captioning pipeline tasks of the installed transformers."""
    from transformers.pipelines import SUPPORTED_TASKS

    return [t for t in ("image-text-to-text", "image-to-text") if t in SUPPORTED_TASKS]


def default_task() -> str:
    tasks = supported_tasks()
    if not tasks:
        raise RuntimeError("this transformers has neither an image-text-to-text nor an image-to-text pipeline")
    return tasks[0]


def render_template(template: str, prompt: str) -> str:
    """``template`` with ``{prompt}`` replaced (other braces are left alone)."""
    return template.replace("{prompt}", prompt)


class Captioner:
    """A captioning pipeline: ``captioner(images, prompts) -> captions`` (one per image)."""

    def __init__(self, model: str, *, task: str | None = None, template: str = DEFAULT_TEMPLATE,
                 max_new_tokens: int = 60, device: str = "cpu", batch_size: int = 8) -> None:  # fmt: skip
        from transformers import pipeline

        task = task or default_task()
        if task not in supported_tasks():
            raise ValueError(f"--task {task}: this transformers supports {supported_tasks()}")
        self.task, self.template, self.max_new_tokens, self.batch_size = task, template, max_new_tokens, batch_size
        self.pipe = pipeline(task, model=model, device=device)
        tokenizer = getattr(self.pipe, "tokenizer", None) or getattr(self.pipe.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # decoder-only generation wants left padding
        processor = getattr(self.pipe, "processor", None)
        self.chat = bool(getattr(processor, "chat_template", None)) if task == "image-text-to-text" else False

    def _text(self, prompt: str) -> Any:
        text = render_template(self.template, prompt)
        if not self.chat:
            return text
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[str]:
        if self.task == "image-to-text":  # transformers 4.x: one prompt per call
            texts = [render_template(self.template, p) for p in prompts]
            outs = [self.pipe(img, prompt=t or None, max_new_tokens=self.max_new_tokens)
                    for img, t in zip(images, texts, strict=True)]  # fmt: skip
        else:
            outs = self.pipe(images=list(images), text=[self._text(p) for p in prompts], return_full_text=False,
                             max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)  # fmt: skip
        captions = []
        for out in outs:
            item = out[0] if isinstance(out, list) else out
            text = item["generated_text"]
            if isinstance(text, list):  # chat output: the conversation, last turn is the answer
                text = text[-1]["content"]
            captions.append(str(text).strip())
        return captions


#: Captioners by name (``--model NAME``): ``builder(**options) -> captioner`` with the command's ``task``,
#: ``template``, ``max_new_tokens``, ``device`` and ``batch_size`` (a builder takes ``**kwargs`` for those it ignores).
#: A captioner is ``captioner(images, prompts) -> captions``. Plugins (:mod:`diffalign.plugins`) add theirs when a
#: name is first not found (the toy world's ``toy``, its pixel detector).
CAPTIONERS: dict[str, Callable[..., Any]] = {}


def register_captioner(name: str, builder: Callable[..., Any], *, replace: bool = False) -> None:
    """Make ``--model name`` build its captioner with ``builder``; the same builder again is a no-op, another under
    a taken name needs ``replace=True``."""
    check_name("captioner", name)
    if not callable(builder):
        raise TypeError(f"captioner {name!r}: the builder must be callable, got {builder!r}")
    if name in CAPTIONERS and CAPTIONERS[name] is not builder and not replace:
        raise ValueError(f"captioner {name!r} is already registered; pass replace=True to override")
    CAPTIONERS[name] = builder


def build_captioner(model: str, **options: Any) -> Any:
    """The registered captioner ``model`` (plugins are loaded if it is unknown so far), else a VLM :class:`Captioner`
    loaded from the local folder or hub id ``model``."""
    if model not in CAPTIONERS:
        load_plugins()
    if model in CAPTIONERS:
        return CAPTIONERS[model](**options)
    return Captioner(model, **options)
