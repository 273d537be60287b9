"""Tiny real CLIP pieces for tests (no Hub access): a word-level CLIP tokenizer from a vocabulary the test writes,
and CLIP text / full models built from small configs with a fixed seed.

    tokenizer = make_tiny_clip_tokenizer(tmp_path / "tokenizer")
    text_encoder = make_tiny_text_encoder(tokenizer, hidden_size=32)           # CLIPTextModel
    clip = make_tiny_clip_model(tokenizer, image_size=32)                     # CLIPModel
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from transformers import CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from hfgen.clip import small_clip_config

TINY_WORDS = (
    *("a", "an", "the", "of", "photo", "picture", "image", "drawing", "small", "big"),
    *("red", "green", "blue", "yellow", "magenta", "cyan", "circle", "square", "triangle"),
    *("handwritten", "digit", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
)


def make_tiny_clip_tokenizer(
    folder: str | Path, words: tuple[str, ...] | list[str] = TINY_WORDS, model_max_length: int = 16
) -> CLIPTokenizer:
    """
    Write ``vocab.json`` + ``merges.txt`` into ``folder`` and load them as a ``CLIPTokenizer``.

    The vocabulary holds lowercase letters, digits and punctuation (alone and as word ends ``c</w>``), the merges that
    build each of ``words`` into one token, then ``<|startoftext|>`` and ``<|endoftext|>`` last (as in OpenAI's).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for c in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            if (merged, piece) not in merges:
                merges.append((merged, piece))
            merged += piece
            vocab.setdefault(merged, len(vocab))
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)


def make_tiny_text_encoder(
    tokenizer: CLIPTokenizer,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    projection_dim: int = 32,
    with_projection: bool = False,
    seed: int = 0,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A randomly initialised CLIP text encoder whose ids match ``tokenizer``, in eval mode."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def make_tiny_clip_model(
    tokenizer: CLIPTokenizer, image_size: int = 16, patch_size: int = 4, width: int = 32, layers: int = 2, seed: int = 0
) -> CLIPModel:
    """A randomly initialised small ``CLIPModel`` (ViT on ``image_size`` images) whose text ids match ``tokenizer``."""
    config = small_clip_config(
        tokenizer,
        image_size=image_size,
        patch_size=patch_size,
        vision_width=width,
        vision_layers=layers,
        text_width=width,
        text_layers=layers,
        num_heads=2,
        projection_dim=width,
    )
    torch.manual_seed(seed)
    return CLIPModel(config).eval()
