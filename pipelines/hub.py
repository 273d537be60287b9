"""Hub plumbing shared by hfgen's pipelines: load a folder or repo id, save a folder that plain diffusers can load,
push it with a model card.

``HFGenHubMixin`` goes first in a pipeline's bases (``class HFGenPipeline(HFGenHubMixin, DiffusionPipeline)``):

- ``from_pretrained(folder or "user/repo")``: a repo id is fetched with ``huggingface_hub.snapshot_download`` (which
  honours ``HF_HUB_OFFLINE``, ``HF_HUB_CACHE`` and ``cache_dir``), then every component is built from the class that
  ``model_index.json`` names, imported from the *installed* ``hfgen``, ``diffusers`` or ``transformers``. No file of
  the repository is ever imported, so this needs no ``trust_remote_code``. A diffusers pipeline's "transformer" or
  "unet" (``facebook/DiT-XL-2-256``, ``google/ddpm-cifar10-32``) is converted to the hfgen denoiser.
- ``save_pretrained``: diffusers' folder (``model_index.json`` with entries like ``["hfgen.unet", "UNetModel"]``,
  safetensors weights) plus two kinds of one-line files so that generic
  ``DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)`` works too:
  ``pipeline.py`` (``from hfgen.pipelines.pipeline_hfgen import HFGenPipeline``, named by
  ``"_class_name": ["pipeline", "HFGenPipeline"]``) and ``<component>/<module>.py`` for each hfgen component, which
  diffusers requires before it accepts a component library that is not its own. Both files only import the
  installed ``hfgen``; diffusers runs them only with ``trust_remote_code=True``.
- ``push_to_hub(repo_id, training_info=..., images=...)``: save, render a sample grid, write README.md (front matter
  ``library_name: hfgen``, tags, training settings, usage snippet) and upload the folder in one commit.

``push_model_to_hub(model, repo_id, ...)`` does the same for a single model (UNetModel, DiTModel, ...).
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from diffusers import ModelMixin
from diffusers.pipelines.pipeline_loading_utils import LOADABLE_CLASSES
from huggingface_hub import snapshot_download

from hfgen.cards import SAMPLE_GRID_FILE, _upload, image_grid, model_card_text, push_model_to_hub  # noqa: F401

logger = logging.getLogger(__name__)
PIPELINE_MODULE = "pipeline"  # model_index.json "_class_name": ["pipeline", "<Class>"] -> pipeline.py

# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def resolve_pretrained_folder(
    pretrained_model_name_or_path: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> str:
    """A local folder as is; a Hub repo id ``"user/name"`` as its snapshot folder in the Hub cache (downloaded when
    online, read from the cache when ``HF_HUB_OFFLINE=1`` or ``local_files_only``)."""
    name = str(pretrained_model_name_or_path)
    if os.path.isdir(name):
        return name
    if name.count("/") != 1 or name.startswith(("/", ".")) or name.endswith("/"):
        raise ValueError(
            f"pretrained_model_name_or_path must be an existing folder or a Hub repo id 'user/name', got {name!r}"
        )
    return snapshot_download(
        name,
        cache_dir=cache_dir,
        revision=revision,
        token=token,
        local_files_only=local_files_only,
        force_download=force_download,
    )


def component_class(library: str, class_name: str) -> type:
    """The class a ``model_index.json`` entry ``[library, class_name]`` names, imported only from the installed
    ``hfgen`` or from a library diffusers itself loads components from (never from the repository)."""
    if not (library == "hfgen" or library.startswith("hfgen.") or library in LOADABLE_CLASSES):
        raise ValueError(
            f"model_index.json names the component library {library!r}; hfgen loads components only from hfgen.* "
            f"and {sorted(LOADABLE_CLASSES)}"
        )
    cls = getattr(importlib.import_module(library), class_name, None)
    if not isinstance(cls, type):
        raise ValueError(f"model_index.json names {library}.{class_name}, but {library} has no class {class_name!r}")
    return cls


def convert_denoiser(model) -> ModelMixin:
    """A diffusers denoiser as the hfgen model that computes the same function: ``DiTTransformer2DModel`` (or
    ``Transformer2DModel`` with ada_norm_zero) -> ``DiTModel.from_diffusers``, ``UNet2DModel`` ->
    ``UNetModel.from_diffusers``."""
    from hfgen import DiTModel, UNetModel

    name = type(model).__name__
    if name in ("DiTTransformer2DModel", "Transformer2DModel"):
        return DiTModel.from_diffusers(model)
    if name == "UNet2DModel":
        return UNetModel.from_diffusers(model)
    raise ValueError(
        f"cannot use a diffusers {name} as an hfgen denoiser; hfgen converts DiTTransformer2DModel, "
        "Transformer2DModel (norm_type='ada_norm_zero') and UNet2DModel"
    )


def load_component(
    cls: type,
    path: str,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    use_safetensors: bool | None = None,
    low_cpu_mem_usage: bool = True,
) -> Any:
    """``cls.from_pretrained(path)`` with the dtype keyword each library expects (schedulers/tokenizers get none)."""
    if issubclass(cls, ModelMixin):
        return cls.from_pretrained(
            path,
            torch_dtype=torch_dtype,
            variant=variant,
            use_safetensors=use_safetensors,
            low_cpu_mem_usage=low_cpu_mem_usage,
        )
    if issubclass(cls, torch.nn.Module):  # transformers PreTrainedModel
        kwargs = {"variant": variant, "use_safetensors": use_safetensors, "low_cpu_mem_usage": low_cpu_mem_usage}
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype
        return cls.from_pretrained(path, **kwargs)
    return cls.from_pretrained(path)


def component_dtype(torch_dtype: torch.dtype | dict | None, name: str) -> torch.dtype | None:
    """The dtype of component ``name``: ``torch_dtype`` itself, or from a per-component dict as in diffusers
    (``{"denoiser": torch.bfloat16, "default": torch.float16}``; float32 for names it lacks without "default")."""
    if isinstance(torch_dtype, dict):
        return torch_dtype.get(name, torch_dtype.get("default", torch.float32))
    return torch_dtype


def check_variant_files(folder: str, config: dict, variant: str | None) -> None:
    """diffusers' ``ValueError`` when no component folder holds a weight file of ``variant`` (e.g. ``*.fp16.*``)."""
    if variant is None:
        return
    for name, entry in config.items():
        sub = os.path.join(folder, name)
        if isinstance(entry, list) and os.path.isdir(sub) and any(f".{variant}." in f for f in os.listdir(sub)):
            return
    raise ValueError(
        f"You are trying to load the model files of the `variant={variant}`, but no such modeling files are available."
    )


def place_components(pipe, device_map: str | None) -> None:
    """diffusers' pipeline ``device_map``: a device ("cpu", "cuda", "cuda:1") puts every model there; "balanced"
    spreads the models over the visible accelerators, largest first onto the least-filled one (CPU without any)."""
    if device_map is None:
        return
    if not isinstance(device_map, str):
        raise ValueError(f"device_map must be a string (a device or 'balanced'), got {type(device_map).__name__}")
    models = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    if device_map != "balanced":
        try:
            device = torch.device(device_map)
        except RuntimeError as error:
            raise ValueError(f"device_map must be a device or 'balanced', got {device_map!r}") from error
        for model in models.values():
            model.to(device)
        return
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    load = dict.fromkeys(devices, 0)
    sizes = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    pipe.hf_device_map = {}
    for name in sorted(sizes, key=sizes.get, reverse=True):
        device = min(load, key=load.get)
        models[name].to(device)
        load[device] += sizes[name]
        pipe.hf_device_map[name] = device


# ----------------------------------------------------------------------------------------------------------------------
# Mixin
# ----------------------------------------------------------------------------------------------------------------------


class HFGenHubMixin:
    """Hub loading, saving and pushing for hfgen pipelines. Put it before ``DiffusionPipeline`` in the bases.

    A pipeline can override ``_card_tags``, ``_card_usage`` and ``_card_samples`` to describe itself on its card.
    """

    # diffusers' own pipelines name their denoiser "transformer" (DiTPipeline) or "unet" (DDPMPipeline, ...): such a
    # model_index.json entry is loaded with its diffusers class and converted (``convert_denoiser``)
    _diffusers_denoiser_names = ("transformer", "unet")

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        torch_dtype: torch.dtype | dict | None = None,
        cache_dir: str | os.PathLike | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        variant: str | None = None,
        use_safetensors: bool | None = None,
        subfolder: str | None = None,
        low_cpu_mem_usage: bool = True,
        device_map: str | None = None,
        dtype: torch.dtype | dict | None = None,
        **components: Any,
    ):
        """
        Load a pipeline from a folder or a Hub repo id: one saved by hfgen, or a diffusers ``DiTPipeline`` /
        ``DDPMPipeline`` / ``DDIMPipeline`` (its transformer or U-Net becomes an hfgen denoiser), e.g.
        ``HFGenPipeline.from_pretrained("facebook/DiT-XL-2-256", torch_dtype=torch.float16)``.

        The arguments are diffusers': ``torch_dtype`` (or its alias ``dtype``; a dict gives one per component, with
        "default" for the rest), ``variant``, ``revision``, ``subfolder`` (the pipeline's folder inside the repo),
        ``low_cpu_mem_usage``, ``device_map`` (a device or "balanced").

        :param components: ready objects that replace saved components (``scheduler=DDIMScheduler(...)``, ``vae=None``).
        """
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"pass torch_dtype or its alias dtype, not both (got {torch_dtype} and {dtype})")
        torch_dtype = dtype if dtype is not None else torch_dtype
        folder = resolve_pretrained_folder(
            pretrained_model_name_or_path, cache_dir, revision, token, local_files_only, force_download
        )
        if subfolder:
            folder = os.path.join(folder, subfolder)
            if not os.path.isdir(folder):
                raise ValueError(f"subfolder {subfolder!r} does not exist in {pretrained_model_name_or_path}")
        config = cls.load_config(folder)
        check_variant_files(folder, config, variant)
        expected, _ = cls._get_signature_keys(cls)
        unknown = sorted(set(components) - set(expected))
        if unknown:
            raise TypeError(
                f"{cls.__name__}.from_pretrained got unknown arguments {unknown}; components are {expected}"
            )

        init_kwargs = {}
        for name in expected:
            if name in components:
                init_kwargs[name] = components[name]
                continue
            source = cls._saved_component_name(config, name)
            entry = config.get(source)
            if not entry or entry[0] is None:
                if name in cls._optional_components:
                    init_kwargs[name] = None
                    continue
                raise ValueError(f"{folder}/model_index.json has no entry for the required component {name!r}")
            component = load_component(
                component_class(*entry),
                os.path.join(folder, source),
                component_dtype(torch_dtype, name),
                variant,
                use_safetensors,
                low_cpu_mem_usage,
            )
            if source != name:
                component = convert_denoiser(component)
            logger.info(f"Loaded {name} as {type(component).__name__} from `{source}` subfolder of {folder}.")
            init_kwargs[name] = component
        pipe = cls(**init_kwargs)
        pipe.register_to_config(_name_or_path=str(pretrained_model_name_or_path))
        place_components(pipe, device_map)
        return pipe

    @classmethod
    def _saved_component_name(cls, config: dict, name: str) -> str:
        """The model_index.json entry that holds component ``name``: itself, or for "denoiser" the "transformer" /
        "unet" of a diffusers pipeline."""
        if name == "denoiser" and name not in config:
            return next((n for n in cls._diffusers_denoiser_names if n in config), name)
        return name

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
    ) -> None:
        """diffusers' folder plus ``pipeline.py`` and ``<component>/<module>.py`` (one import each) for plain
        ``DiffusionPipeline.from_pretrained(..., trust_remote_code=True)``; see the module docstring."""
        super().save_pretrained(
            save_directory, safe_serialization=safe_serialization, variant=variant, max_shard_size=max_shard_size
        )
        cls = type(self)
        index_path = Path(save_directory, "model_index.json")
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index["_class_name"] = [PIPELINE_MODULE, cls.__name__]
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        header = (
            '"""Lets plain diffusers load this hfgen {what} (needs `pip install hfgen`). Generated by hfgen."""\n\n'
        )
        Path(save_directory, f"{PIPELINE_MODULE}.py").write_text(
            header.format(what="pipeline") + f"from {cls.__module__} import {cls.__name__}  # noqa: F401\n",
            encoding="utf-8",
        )
        for name, entry in index.items():
            if isinstance(entry, list) and entry and isinstance(entry[0], str) and entry[0].startswith("hfgen."):
                Path(save_directory, name, f"{entry[0]}.py").write_text(
                    header.format(what="component") + f"from {entry[0]} import {entry[1]}  # noqa: F401\n",
                    encoding="utf-8",
                )

    def push_to_hub(
        self,
        repo_id: str,
        training_info: dict[str, Any] | None = None,
        images: list[PIL.Image.Image] | None = None,
        num_sample_images: int = 4,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
    ):
        """
        Save the pipeline, a sample grid (``images``, or ``num_sample_images`` fresh samples with seed 0) and a model
        card into one folder and upload it as one commit.

        :param training_info: settings shown on the card, e.g. ``{"dataset": "shapes", "max_train_steps": 2000}``.
        """
        if images is None:
            images = self._card_samples(num_sample_images)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            image_grid(images).save(os.path.join(tmp, SAMPLE_GRID_FILE))
            tags, pipeline_tag = self._card_tags()
            card = model_card_text(
                repo_id, tags, self._card_usage(repo_id), training_info, pipeline_tag, self._card_description()
            )
            Path(tmp, "README.md").write_text(card, encoding="utf-8")
            return _upload(tmp, repo_id, token, private, commit_message or f"Upload {type(self).__name__}", create_pr)

    # --- what a pipeline says about itself on its card (override per pipeline) -------------------------------------

    def _card_tags(self) -> tuple[list[str], str | None]:
        """(tags, pipeline_tag)."""
        return [], None

    def _card_description(self) -> str:
        components = ", ".join(f"{k}: {type(v).__name__}" for k, v in self.components.items() if v is not None)
        return f"An hfgen `{type(self).__name__}` ({components})."

    def _card_usage(self, repo_id: str) -> str:
        name = type(self).__name__
        return f'from hfgen import {name}\n\npipe = {name}.from_pretrained("{repo_id}")\nimages = pipe().images'

    def _card_samples(self, num_images: int) -> list[PIL.Image.Image]:
        generator = torch.Generator().manual_seed(0)
        return self(batch_size=num_images, generator=generator, output_type="pil").images
