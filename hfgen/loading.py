"""Checked, pickle-safe loading of hfgen models from a folder.

``SafeLoadingMixin`` goes first in a model's bases (``class UNetModel(SafeLoadingMixin, ModelMixin, ConfigMixin)``)
and wraps diffusers' ``ModelMixin.from_pretrained`` for a local folder (a Hub repo id is resolved to its local
snapshot folder by the pipelines before it gets here):

1. missing weights: ``FileNotFoundError`` naming the folder, the file that was looked for and the files present;
2. a truncated or corrupt ``.safetensors`` file: ``OSError`` naming the file (its header is checked against its size);
3. a pickled ``.bin`` file is opened only with ``torch.load(..., weights_only=True)`` first, so a pickle that would
   build objects other than tensors (code execution) is refused with a ``ValueError`` naming the file before diffusers
   sees it;
4. weights that do not match ``config.json`` (other shapes, missing or unexpected tensors): ``ValueError`` naming the
   weights file and the config file, instead of diffusers' silent random initialisation of missing tensors.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile

import safetensors
import safetensors.torch
import torch
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

CONFIG_NAME = "config.json"


def _with_variant(name: str, variant: str | None) -> str:
    """diffusion_pytorch_model.safetensors -> diffusion_pytorch_model.<variant>.safetensors."""
    if variant is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def find_weight_files(folder: str, variant: str | None = None, use_safetensors: bool | None = None) -> list[str]:
    """The weight files diffusers would read from ``folder`` (one file or the shards of an index), safetensors first;
    ``FileNotFoundError`` naming what was looked for when there are none."""
    names = {True: [SAFETENSORS_WEIGHTS_NAME], False: [WEIGHTS_NAME]}.get(
        use_safetensors, [SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME]
    )
    for name in names:
        path = os.path.join(folder, _with_variant(name, variant))
        if os.path.isfile(path):
            return [path]
        index = os.path.join(folder, f"{name}.index.json")
        if variant is None and os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
            if missing:
                raise FileNotFoundError(f"{index} names shards that are missing from {folder}: {missing}")
            return [os.path.join(folder, s) for s in shards]
    expected = " or ".join(os.path.join(folder, _with_variant(n, variant)) for n in names)
    raise FileNotFoundError(
        f"no model weights found: expected {expected}; the folder holds {sorted(os.listdir(folder))}"
    )


def check_safetensors_file(path: str) -> None:
    """Raise ``OSError`` naming ``path`` when its header is unreadable or describes more bytes than the file has."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        header_size = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if header_size is None or 8 + header_size > size:
            raise OSError(f"{path} is truncated or not a safetensors file ({size} bytes, header cut off)")
        try:
            header = json.loads(f.read(header_size))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise OSError(f"{path} is not a valid safetensors file: unreadable header ({error})") from error
    if 8 + header_size + end != size:
        raise OSError(
            f"{path} is truncated or corrupt: its header describes {8 + header_size + end} bytes, the file has {size}"
        )


def check_pickle_file(path: str) -> None:
    """Open a ``.bin`` file with ``torch.load(weights_only=True)``; ``ValueError`` naming ``path`` if it is refused."""
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, TypeError, ValueError) as error:
        raise ValueError(
            f"refusing to load {path}: it is not a plain tensor pickle (torch.load with weights_only=True failed: "
            f"{str(error).splitlines()[0]}); save the weights as safetensors"
        ) from error


class SafeLoadingMixin:
    """Checked ``from_pretrained`` for an hfgen ``ModelMixin`` subclass; see the module docstring."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        folder = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        if not os.path.isdir(folder):  # a repo id for diffusers' own download; nothing local to check
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

        # 1. the files: present, complete, and (for pickles) tensors only
        files = find_weight_files(folder, kwargs.get("variant"), kwargs.get("use_safetensors"))
        for path in files:
            if path.endswith(".safetensors"):
                check_safetensors_file(path)
            else:
                check_pickle_file(path)
        where = files[0] if len(files) == 1 else f"the shards {files}"
        config_path = os.path.join(folder, CONFIG_NAME)

        # 2. load, naming the files in any mismatch between config and weights
        return_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        except ValueError as error:
            raise ValueError(f"cannot load {where} with {config_path}: {error}") from error
        except OSError as error:
            raise OSError(f"cannot load {where}: {error}") from error
        missing, unexpected = info.get("missing_keys", []), info.get("unexpected_keys", [])
        if missing or unexpected:
            raise ValueError(
                f"{where} does not match {config_path}: tensors missing from the file: {sorted(missing)[:8]}, "
                f"tensors the model does not have: {sorted(unexpected)[:8]}"
            )
        return (model, info) if return_info else model


# ----------------------------------------------------------------------------------------------------------------------
# EMA state for training checkpoints, as safetensors (accelerate's register_for_checkpointing pickles it instead and
# reads it back with weights_only=False)
# ----------------------------------------------------------------------------------------------------------------------

EMA_STATE_NAME = "ema_state.safetensors"


def save_ema_state(ema, folder: str | os.PathLike) -> str:
    """Write a diffusers ``EMAModel``'s state to ``folder/ema_state.safetensors``: the shadow weights as tensors,
    the scalar settings (decay, optimization_step, ...) as JSON metadata. Returns the file path."""
    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    tensors = {f"shadow_params.{i}": p.detach().contiguous().cpu() for i, p in enumerate(shadow)}
    path = os.path.join(os.fspath(folder), EMA_STATE_NAME)
    safetensors.torch.save_file(tensors, path, metadata={"state": json.dumps(state)})
    return path


def load_ema_state(ema, folder: str | os.PathLike) -> None:
    """Load ``folder/ema_state.safetensors`` (written by ``save_ema_state``) into ``ema`` in place."""
    path = os.path.join(os.fspath(folder), EMA_STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no EMA state in {folder}: expected {path}")
    check_safetensors_file(path)
    with safetensors.safe_open(path, framework="pt") as f:
        state = json.loads(f.metadata()["state"])
        shadow = [f.get_tensor(f"shadow_params.{i}") for i in range(len(f.keys()))]
    ema.load_state_dict({**state, "shadow_params": shadow})
