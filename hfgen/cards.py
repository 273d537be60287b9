"""Model cards and uploads shared by hfgen's models and pipelines.

``HubCardMixin`` gives every hfgen model a ``push_to_hub`` that writes a model card (front matter
``library_name: hfgen``, tags, training settings, an optional sample grid, a usage snippet) beside the safetensors
weights and uploads the folder in one commit. Pipelines use the same card through ``hfgen.pipelines.hub``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import PIL.Image
from diffusers import ModelMixin
from huggingface_hub import HfApi, ModelCardData

SAMPLE_GRID_FILE = "samples.png"

# ----------------------------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------------------------


def image_grid(images: list[PIL.Image.Image], cols: int | None = None) -> PIL.Image.Image:
    """Paste equally sized images into a near-square RGB grid, row by row."""
    if not images:
        raise ValueError("image_grid needs at least one image, got an empty list")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = PIL.Image.new("RGB", (cols * w, rows * h))
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB"), (i % cols * w, i // cols * h))
    return grid


def model_card_text(
    repo_id: str,
    tags: list[str],
    usage: str,
    training_info: dict[str, Any] | None = None,
    pipeline_tag: str | None = None,
    description: str = "",
    grid_file: str | None = SAMPLE_GRID_FILE,
    generic_pipeline_snippet: bool = True,
) -> str:
    """README.md: YAML front matter (``library_name: hfgen``, tags), samples, usage snippet, training settings."""
    tags = list(dict.fromkeys(["hfgen", "diffusers", *tags]))
    meta = ModelCardData(library_name="hfgen", tags=tags, pipeline_tag=pipeline_tag)
    lines = ["---", meta.to_yaml(), "---", "", f"# {repo_id}", ""]
    if description:
        lines += [description, ""]
    if grid_file:
        lines += [f"![samples]({grid_file})", ""]
    lines += ["## Usage", "", "```python", usage.strip(), "```", ""]
    if generic_pipeline_snippet:
        lines += [
            "Plain diffusers loads it too (with `pip install hfgen`; the repository's `pipeline.py` only imports hfgen):",
            "",
            "```python",
            "from diffusers import DiffusionPipeline",
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{repo_id}", trust_remote_code=True)',
            "```",
            "",
        ]
    if training_info:
        lines += ["## Training", "", "| setting | value |", "| --- | --- |"]
        lines += [f"| {k} | {json.dumps(v) if not isinstance(v, str) else v} |" for k, v in training_info.items()]
        lines += [""]
    return "\n".join(lines)


def _upload(folder: str, repo_id: str, token, private, commit_message: str, create_pr: bool):
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message, create_pr=create_pr)


def push_model_to_hub(
    model: ModelMixin,
    repo_id: str,
    training_info: dict[str, Any] | None = None,
    images: list[PIL.Image.Image] | None = None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    create_pr: bool = False,
    variant: str | None = None,
):
    """Upload one hfgen model (safetensors + config) with a model card and, when ``images`` are given, a sample grid;
    ``variant`` names the weights file as diffusers does (``diffusion_pytorch_model.<variant>.safetensors``)."""
    cls = type(model)
    usage = f'from hfgen import {cls.__name__}\n\nmodel = {cls.__name__}.from_pretrained("{repo_id}")'
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True, variant=variant)
        if images:
            image_grid(images).save(os.path.join(tmp, SAMPLE_GRID_FILE))
        card = model_card_text(
            repo_id,
            [cls.__name__.lower()],
            usage,
            training_info,
            grid_file=SAMPLE_GRID_FILE if images else None,
            generic_pipeline_snippet=False,
        )
        Path(tmp, "README.md").write_text(card, encoding="utf-8")
        return _upload(tmp, repo_id, token, private, commit_message or f"Upload {cls.__name__}", create_pr)


class HubCardMixin:
    """Put before ``ModelMixin`` in a model's bases: ``model.push_to_hub(repo_id)`` then uploads a model card too."""

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        training_info: dict[str, Any] | None = None,
        images: list[PIL.Image.Image] | None = None,
        variant: str | None = None,
        safe_serialization: bool = True,
        **kwargs: Any,
    ):
        """Upload this model (safetensors + config) with README.md; ``images`` become the card's sample grid;
        ``variant`` as in diffusers' ``ModelMixin.push_to_hub``."""
        if kwargs:
            raise TypeError(f"push_to_hub got unexpected arguments {sorted(kwargs)}")
        if not safe_serialization:
            raise ValueError("hfgen uploads safetensors only (safe_serialization=False is not supported)")
        return push_model_to_hub(
            self, repo_id, training_info, images, commit_message, private, token, create_pr, variant=variant
        )
