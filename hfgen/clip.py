"""CLIP helpers around transformers' ``CLIPModel``: a tokenizer built from captions, image preprocessing for a small
CLIP, text/image embeddings, zero-shot classification and CLIP score.

- ``train_clip_tokenizer``: a byte-level BPE vocabulary learned from captions with the ``tokenizers`` library,
  wrapped as a transformers ``CLIPTokenizer`` (same normaliser, pre-tokeniser and ``</w>`` word ends as OpenAI's).
- ``small_clip_config``: a ``CLIPConfig`` for training from scratch on small images (ViT with patch 4 on 32x32).
- ``preprocess_images``: PIL / array / tensor images -> CLIP ``pixel_values`` sized by the model's config.
- ``encode_text`` / ``encode_images``: L2-normalised projected embeddings (B, D).
- ``zero_shot_classify``: prompt-ensembled zero-shot classification (Radford et al. 2021, Sec. 3.1.4).
- ``clip_score``: ``max(100 * cos(E_I, E_C), 0)`` per image-caption pair (Hessel et al. 2021).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "{}")

# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer and config
# ----------------------------------------------------------------------------------------------------------------------


def train_clip_tokenizer(texts: Iterable[str], vocab_size: int = 4096, model_max_length: int = 77) -> CLIPTokenizer:
    """
    Learn a byte-level BPE vocabulary from ``texts`` and wrap it as a ``CLIPTokenizer``.

    The vocabulary holds every byte-level character, alone and as a word end (``c</w>``), so any text encodes without
    unknown tokens; the learned merges come next and ``<|startoftext|>`` / ``<|endoftext|>`` are the last two ids (as
    in OpenAI's vocabulary, so CLIP's "pool at the first end-of-text token" reads the right position).

    :param texts: training captions.
    :param vocab_size: upper bound on the learned vocabulary (small caption sets stop earlier: whole words).
    :param model_max_length: the tokenizer's padding / truncation length, the text model's max_position_embeddings.
    """
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    # the same text pipeline as transformers' CLIPTokenizer, so that its BPE model sees the words we trained on
    bpe = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
    )
    bpe.train_from_iterator(texts, trainer)

    merges = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(bpe.to_str())["model"]["merges"]
    ]
    # ids in a fixed order (the trainer numbers the word-end characters in hash-map order, which changes per process)
    vocab = {}
    ordered = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + sorted(bpe.get_vocab())
    for token in ordered + [BOS_TOKEN, EOS_TOKEN]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def small_clip_config(
    tokenizer: CLIPTokenizer,
    image_size: int = 32,
    patch_size: int = 4,
    num_channels: int = 3,
    vision_width: int = 128,
    vision_layers: int = 4,
    text_width: int = 128,
    text_layers: int = 4,
    num_heads: int = 4,
    projection_dim: int = 128,
    max_position_embeddings: int | None = None,
) -> CLIPConfig:
    """
    A ``CLIPConfig`` for training from scratch on small images, with the text ids taken from ``tokenizer``.
    Logit scale starts at log(1 / 0.07), as in CLIP.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size ({image_size}) must be divisible by patch_size ({patch_size})")
    max_len = max_position_embeddings or tokenizer.model_max_length
    if max_len > 10_000:
        raise ValueError(f"set max_position_embeddings: the tokenizer's model_max_length is unset ({max_len})")
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": text_width,
        "intermediate_size": 4 * text_width,
        "num_hidden_layers": text_layers,
        "num_attention_heads": num_heads,
        "max_position_embeddings": max_len,
        "projection_dim": projection_dim,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "hidden_size": vision_width,
        "intermediate_size": 4 * vision_width,
        "num_hidden_layers": vision_layers,
        "num_attention_heads": num_heads,
        "image_size": image_size,
        "patch_size": patch_size,
        "num_channels": num_channels,
        "projection_dim": projection_dim,
    }
    return CLIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=projection_dim,
        logit_scale_init_value=float(np.log(1 / 0.07)),
    )


# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------------------


def _to_float_images(images) -> list[torch.Tensor]:
    """PIL images, an array (B, H, W, C) / (H, W, C) in [0, 1], or a tensor (B, C, H, W) in [0, 1] -> [(C, H, W)]."""
    if isinstance(images, (Image.Image, np.ndarray, torch.Tensor)) and not (
        isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4
    ):
        images = [images]
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    out = []
    for image in images:
        if isinstance(image, Image.Image):
            image = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        elif isinstance(image, np.ndarray):
            image = torch.from_numpy(image).permute(2, 0, 1)
        if not torch.is_tensor(image) or image.ndim != 3:
            raise TypeError(
                "images must be PIL images, numpy arrays (B, H, W, C) or tensors (B, C, H, W) in [0, 1], "
                f"got {type(image).__name__}"
            )
        out.append(image.float())
    return out


def preprocess_images(
    images,
    image_size: int | CLIPModel | CLIPConfig,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    num_channels: int = 3,
) -> torch.Tensor:
    """
    Resize (shortest edge, bicubic, antialiased), center crop and normalise images into CLIP ``pixel_values``.

    :param images: PIL images, a numpy array (B, H, W, C) or a tensor (B, C, H, W), values in [0, 1]
        (what pipelines return for ``output_type="np"`` / ``"pt"``). Grey images are repeated to ``num_channels``.
    :param image_size: the side length, or a ``CLIPModel`` / ``CLIPConfig`` to read ``vision_config.image_size`` from.
    :return: a float tensor (B, num_channels, S, S).
    """
    if not isinstance(image_size, int):
        vision_config = getattr(image_size, "config", image_size).vision_config
        image_size, num_channels = vision_config.image_size, vision_config.num_channels
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    pixel_values = []
    for image in _to_float_images(images):
        if image.shape[0] == 1:
            image = image.expand(num_channels, -1, -1)  # (C, H, W)
        _, H, W = image.shape
        scale = image_size / min(H, W)
        h, w = max(image_size, round(H * scale)), max(image_size, round(W * scale))
        if (h, w) != (H, W):
            image = F.interpolate(image[None], size=(h, w), mode="bicubic", antialias=True, align_corners=False)[0]
        top, left = (h - image_size) // 2, (w - image_size) // 2
        image = image[:, top : top + image_size, left : left + image_size].clamp(0, 1)  # (C, S, S)
        pixel_values.append((image - mean_t) / std_t)
    return torch.stack(pixel_values)  # (B, C, S, S)


def tokenize(
    tokenizer, texts: Sequence[str], max_length: int | None = None, padding: str = "max_length"
) -> dict[str, torch.Tensor]:
    """Truncate to the tokenizer's max length (or ``max_length``) and pad: ``input_ids`` and ``attention_mask``.

    :param padding: ``"max_length"`` (every batch that long, as a text encoder conditioning a denoiser sees its
        prompts) or ``"longest"`` (the batch's longest text: the same causal text features, at a fraction of the cost
        for short captions; what CLIP training uses).
    """
    max_length = max_length or tokenizer.model_max_length
    return dict(tokenizer(list(texts), padding=padding, max_length=max_length, truncation=True, return_tensors="pt"))


# ----------------------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------------------


def _features(out) -> torch.Tensor:
    """transformers >= 5 returns a model output whose pooler_output is the projection; older versions a tensor."""
    return out if torch.is_tensor(out) else out.pooler_output


def _split_processor(tokenizer_or_processor):
    """(tokenizer, image_processor or None) from a tokenizer or a ``CLIPProcessor``."""
    if hasattr(tokenizer_or_processor, "image_processor") and hasattr(tokenizer_or_processor, "tokenizer"):
        return tokenizer_or_processor.tokenizer, tokenizer_or_processor.image_processor
    return tokenizer_or_processor, None


def encode_text(model: CLIPModel, tokenizer, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised projected text embeddings (N, D)."""
    tokenizer, _ = _split_processor(tokenizer)
    device = model.logit_scale.device
    max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    embeds = []
    for i in range(0, len(texts), batch_size):
        batch = {k: v.to(device) for k, v in tokenize(tokenizer, texts[i : i + batch_size], max_length).items()}
        embeds.append(_features(model.get_text_features(**batch)))
    return F.normalize(torch.cat(embeds).float(), dim=-1)


def encode_images(
    model: CLIPModel, images=None, processor=None, pixel_values: torch.Tensor | None = None, batch_size: int = 256
) -> torch.Tensor:
    """
    L2-normalised projected image embeddings (N, D).

    :param images: as in ``preprocess_images`` (values in [0, 1]); prepared by ``processor``'s image processor when
        ``processor`` is a ``CLIPProcessor``, else by ``preprocess_images`` with the model's config.
    :param pixel_values: already preprocessed CLIP inputs (N, C, S, S), in place of ``images``.
    """
    if (images is None) == (pixel_values is None):
        raise ValueError("pass exactly one of images and pixel_values")
    _, image_processor = _split_processor(processor)
    if pixel_values is None and image_processor is not None:
        pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
    elif pixel_values is None:
        pixel_values = preprocess_images(images, model)
    device, dtype = model.logit_scale.device, model.visual_projection.weight.dtype
    embeds = []
    for i in range(0, len(pixel_values), batch_size):
        batch = pixel_values[i : i + batch_size].to(device, dtype)
        embeds.append(_features(model.get_image_features(pixel_values=batch)))
    return F.normalize(torch.cat(embeds).float(), dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
# Zero-shot classification and CLIP score
# ----------------------------------------------------------------------------------------------------------------------


class ZeroShotOutput(NamedTuple):
    """``probs`` (N, K): softmax over classes of the scaled cosine similarities; ``predictions`` (N,): argmax."""

    probs: torch.Tensor
    predictions: torch.Tensor


@torch.no_grad()
def zero_shot_weights(
    model: CLIPModel, tokenizer, class_names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
) -> torch.Tensor:
    """
    One classifier row per class: the normalised text embeddings of every template filled with the class name,
    averaged and normalised again (prompt ensembling). Returns (K, D).
    """
    if len(class_names) == 0:
        raise ValueError("class_names must not be empty")
    if len(templates) == 0 or any("{}" not in t for t in templates):
        raise ValueError(f"templates must be a non-empty list of strings with a '{{}}' slot, got {list(templates)}")
    texts = [t.format(name) for name in class_names for t in templates]
    embeds = encode_text(model, tokenizer, texts).view(len(class_names), len(templates), -1)  # (K, T, D)
    return F.normalize(embeds.mean(dim=1), dim=-1)  # (K, D)


@torch.no_grad()
def zero_shot_classify(
    model: CLIPModel,
    tokenizer,
    images,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> ZeroShotOutput:
    """
    Zero-shot classification of ``images`` into ``class_names``.

    :param tokenizer: a CLIP tokenizer, or a ``CLIPProcessor`` (its image processor then prepares the images).
    :param images: PIL images, or an array (B, H, W, C) / tensor (B, C, H, W) with values in [0, 1].
    :param templates: prompt templates with a ``{}`` slot; the class embeddings are averaged over them.
    """
    weights = zero_shot_weights(model, tokenizer, class_names, templates)  # (K, D)
    image_embeds = encode_images(model, images, processor=tokenizer)  # (N, D)
    logits = model.logit_scale.exp().float() * image_embeds @ weights.T  # (N, K)
    probs = logits.softmax(dim=-1)
    return ZeroShotOutput(probs=probs, predictions=probs.argmax(dim=-1))


@torch.no_grad()
def clip_score(model: CLIPModel, tokenizer, images, prompts: Sequence[str]) -> torch.Tensor:
    """
    CLIP score of each image with its prompt, ``max(100 * cos(E_I, E_C), 0)`` in [0, 100]: a tensor (N,).
    Take ``.mean()`` for the usual data-set score.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    image_embeds = encode_images(model, images, processor=tokenizer)  # (N, D)
    if len(prompts) != len(image_embeds):
        raise ValueError(f"clip_score needs one prompt per image, got {len(prompts)} prompts for {len(image_embeds)}")
    text_embeds = encode_text(model, tokenizer, prompts)  # (N, D)
    return (100 * (image_embeds * text_embeds).sum(dim=-1)).clamp(min=0)
