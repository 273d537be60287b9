"""hfgen.clip helpers and training/train_clip.py, with tiny real CLIP models (no Hub access)."""

import json
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny_clip import make_tiny_clip_model, make_tiny_clip_tokenizer
from tolerances import assert_close_float32
from transformers import CLIPProcessor, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from hfgen import UNET_PRESETS, DDIMScheduler, HFGenTextToImagePipeline, UNetModel
from hfgen.clip import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    clip_score,
    encode_images,
    encode_text,
    preprocess_images,
    train_clip_tokenizer,
    zero_shot_classify,
    zero_shot_weights,
)
from hfgen.training import train_clip

COLOR_RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


@contextmanager
def one_thread():
    """Tiny models train much faster on one thread than on two contended ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tiny_clip_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def clip(tokenizer):
    return make_tiny_clip_model(tokenizer, image_size=16)


def solid(color: str, size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), COLOR_RGB[color])


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------------


def test_train_clip_tokenizer_learns_caption_words_and_round_trips(tmp_path):
    captions = ["a red circle", "a green square", "a blue triangle"] * 3
    tok = train_clip_tokenizer(captions, model_max_length=12)
    assert tok.tokenize("A red  circle") == ["a</w>", "red</w>", "circle</w>"]  # lower-cased, whole words
    ids = tok("a zebra!")["input_ids"]
    assert tok.unk_token_id not in ids[1:-1]  # unseen words fall back to byte-level characters, never unknown
    assert (ids[0], ids[-1]) == (tok.bos_token_id, tok.eos_token_id)
    assert {tok.bos_token_id, tok.eos_token_id} == {len(tok) - 2, len(tok) - 1}  # specials last, as in OpenAI's
    tok.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert loaded("a blue square")["input_ids"] == tok("a blue square")["input_ids"]
    assert loaded.model_max_length == 12


def test_tiny_tokenizer_pads_with_eos(tokenizer):
    batch = tokenizer(["a red circle"], padding="max_length", max_length=8)
    assert batch["input_ids"][0][:5] == [
        tokenizer.bos_token_id,
        *tokenizer.convert_tokens_to_ids(["a</w>", "red</w>", "circle</w>"]),
        tokenizer.eos_token_id,
    ]
    assert batch["attention_mask"][0] == [1] * 5 + [0] * 3


# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------------------


def test_preprocess_images_accepts_pil_arrays_tensors(clip):
    rng = np.random.default_rng(0)
    array = rng.random((2, 20, 20, 3)).astype(np.float32)  # (B, H, W, C) in [0, 1]
    pil = [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
    from_array = preprocess_images(array, clip)
    from_tensor = preprocess_images(torch.from_numpy(array).permute(0, 3, 1, 2), clip)
    from_pil = preprocess_images(pil, clip)
    assert from_array.shape == (2, 3, 16, 16)  # the model's vision_config.image_size
    torch.testing.assert_close(from_array, from_tensor)
    torch.testing.assert_close(from_array, from_pil, atol=0.02, rtol=0)  # uint8 rounding only

    # normalisation with CLIP's mean/std; grey images become 3 channels; non-square: short side, centre crop
    white = preprocess_images(Image.new("L", (32, 64), 255), 16)
    assert white.shape == (1, 3, 16, 16)
    expected = (1 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(white[0, :, 8, 8], expected)


def test_preprocess_images_rejects_other_types():
    with pytest.raises(TypeError, match="images must be PIL images"):
        preprocess_images(["not an image"], 16)


# ----------------------------------------------------------------------------------------------------------------------
# Zero-shot and CLIP score
# ----------------------------------------------------------------------------------------------------------------------


def test_zero_shot_averages_normalised_template_embeddings(clip, tokenizer):
    templates = ("a photo of a {}", "a {} square")
    images = [solid("red"), solid("green"), solid("blue")]
    out = zero_shot_classify(clip, tokenizer, images, ["red", "green", "blue"], templates)
    assert out.probs.shape == (3, 3)
    torch.testing.assert_close(out.probs.sum(-1), torch.ones(3))
    assert torch.equal(out.predictions, out.probs.argmax(-1))

    # by hand: per class, mean of the normalised template embeddings, normalised again
    with torch.no_grad():
        rows = []
        for name in ["red", "green", "blue"]:
            emb = encode_text(clip, tokenizer, [t.format(name) for t in templates])  # (T, D), normalised
            rows.append(F.normalize(emb.mean(0), dim=-1))
        weights = torch.stack(rows)
        image_embeds = encode_images(clip, images)
        probs = (clip.logit_scale.exp() * image_embeds @ weights.T).softmax(-1)
    torch.testing.assert_close(zero_shot_weights(clip, tokenizer, ["red", "green", "blue"], templates), weights)
    torch.testing.assert_close(out.probs, probs)

    with pytest.raises(ValueError, match="templates must be"):
        zero_shot_classify(clip, tokenizer, images, ["red"], ("no slot",))


def test_zero_shot_with_a_clip_processor(clip, tokenizer, tmp_path):
    """A CLIPProcessor (as saved by train_clip.py) prepares the images like preprocess_images."""
    train_clip.save_image_processor_config(tmp_path, 16)
    tokenizer.save_pretrained(tmp_path)
    processor = CLIPProcessor.from_pretrained(tmp_path)
    images = [solid("red", 24), solid("blue", 24)]
    with_processor = zero_shot_classify(clip, processor, images, ["red", "blue"])
    with_tokenizer = zero_shot_classify(clip, tokenizer, images, ["red", "blue"])
    torch.testing.assert_close(with_processor.probs, with_tokenizer.probs, atol=1e-3, rtol=0)


def test_clip_score_is_clamped_scaled_cosine(clip, tokenizer):
    images = [solid("red"), solid("green")]
    prompts = ["a red circle", "a green square"]
    scores = clip_score(clip, tokenizer, images, prompts)
    cos = (encode_images(clip, images) * encode_text(clip, tokenizer, prompts)).sum(-1)
    torch.testing.assert_close(scores, (100 * cos).clamp(min=0))
    assert scores.shape == (2,) and (scores >= 0).all() and (scores <= 100).all()
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(clip, tokenizer, images, ["a red circle"])


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def test_contrastive_loss_decreases(tokenizer):
    """A few AdamW steps on one batch of (colour image, colour caption) pairs lower the symmetric InfoNCE loss."""
    model = make_tiny_clip_model(tokenizer, image_size=16).train()
    colors = list(COLOR_RGB)
    pixel_values = preprocess_images([solid(c) for c in colors], model)
    text = tokenizer([f"a {c} square" for c in colors], padding="max_length", max_length=8, return_tensors="pt")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    with one_thread():
        for _ in range(8):
            out = model(pixel_values=pixel_values, input_ids=text.input_ids, attention_mask=text.attention_mask)
            loss = train_clip.contrastive_loss(out.logits_per_image)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_contrastive_loss_is_symmetric_cross_entropy():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    expected = (F.cross_entropy(logits, torch.arange(2)) + F.cross_entropy(logits.T, torch.arange(2))) / 2
    torch.testing.assert_close(train_clip.contrastive_loss(logits), expected)


def test_train_clip_batches_pad_to_the_longest_caption_and_keep_the_causal_text_features(tokenizer):
    """The loader pads each batch to its longest caption, not to --max_length: the pooled text features (read at the
    end-of-text token of a causal model) and the contrastive loss are those of the full padding, at a fraction of the
    text model's work; each image is preprocessed once, later epochs read it back."""
    from hfgen.data import make_shapes_dataset

    model = make_tiny_clip_model(tokenizer, image_size=16).eval()
    data = make_shapes_dataset(num_images=6, image_size=16, seed=0)
    args = train_clip.parse_args(["--output_dir", "unused", "--train_batch_size", "6"])
    loader = train_clip.make_loader(args, data, tokenizer, image_size=16, max_length=16)
    batch = next(iter(loader))
    full = tokenizer(batch_texts := tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True),
                     padding="max_length", max_length=16, return_tensors="pt")  # fmt: skip
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max()) < 16
    assert len(batch_texts) == 6 and full.input_ids.shape == (6, 16)
    with torch.no_grad():
        short = model(**batch)
        long = model(input_ids=full.input_ids, attention_mask=full.attention_mask, pixel_values=batch["pixel_values"])
    # the same softmax over the same keys; float32 roundings of shorter reductions differ at most by a few eps
    assert_close_float32(short.text_embeds, long.text_embeds, num_eps=64)
    loss_short, loss_long = (train_clip.contrastive_loss(o.logits_per_image) for o in (short, long))
    assert_close_float32(loss_short, loss_long, num_eps=64)
    examples = loader.dataset
    calls = []
    examples.pixel_values.transform = lambda image: calls.append(1) or examples.preprocess(image)
    for i in range(6):
        torch.testing.assert_close(examples[i]["pixel_values"], preprocess_images([data[i]["image"]], 16)[0])
    assert not calls  # all six kept from the first batch


TINY_ARGS = [
    *("--resolution", "16", "--patch_size", "4", "--num_heads", "2", "--max_length", "8"),
    *(
        "--vision_width",
        "32",
        "--text_width",
        "32",
        "--projection_dim",
        "32",
        "--vision_layers",
        "2",
        "--text_layers",
        "2",
    ),
    *("--report_to", "none", "--train_batch_size", "32"),
]


def test_train_clip_zero_shot_beats_chance(tmp_path):
    """~150 steps on the built-in shapes: the held-out (other seed) zero-shot accuracy is far above chance."""
    out = tmp_path / "clip"
    args = train_clip.parse_args(
        [*TINY_ARGS, "--output_dir", str(out), "--max_train_steps", "150", "--num_shapes", "512"]
        + [
            "--num_eval_images",
            "128",
            "--learning_rate",
            "2e-3",
            "--lr_warmup_steps",
            "10",
            "--checkpointing_steps",
            "0",
        ]
    )
    with one_thread():
        report = train_clip.main(args)
    saved = json.loads((out / "zero_shot.json").read_text())
    assert saved["zero_shot_accuracy"] == pytest.approx(report["zero_shot_accuracy"])
    assert saved["steps"] == 150 and saved["num_classes"] == 18
    assert saved["color_accuracy"] > 0.6  # chance 1/6
    assert saved["zero_shot_accuracy"] > 3 * saved["chance"]  # 18 (colour, shape) classes

    # the saved text tower is the trained one, with its projection
    full = train_clip.CLIPModel.from_pretrained(out / "clip")
    text_encoder = CLIPTextModelWithProjection.from_pretrained(out / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")
    ids = tokenizer(["a red circle"], padding="max_length", max_length=8, return_tensors="pt")
    with torch.no_grad():
        # two model classes, the same weights and batch: the same ops up to a few roundings (< 1 eps measured)
        assert_close_float32(text_encoder(**ids).text_embeds, full.get_text_features(**ids).pooler_output, num_eps=64)


def test_train_clip_checkpoints_resume_and_layout_for_train_diffusion(tmp_path):
    out = tmp_path / "clip"
    common = [*TINY_ARGS, "--output_dir", str(out), "--num_shapes", "64", "--num_eval_images", "32", "--use_ema"]
    with one_thread():
        train_clip.main(
            train_clip.parse_args(
                [*common, "--max_train_steps", "4", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1"]
            )
        )
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # written via temp + rename
        report = train_clip.main(
            train_clip.parse_args([*common, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"])
        )
    assert report["steps"] == 6
    assert {"clip", "text_encoder", "tokenizer", "zero_shot.json"} <= {p.name for p in out.iterdir()}

    # train_diffusion.py --text_encoder OUTPUT reads text_encoder/ and tokenizer/
    from hfgen.training.train_diffusion import load_text_encoder

    text_encoder, tokenizer = load_text_encoder(str(out))
    assert isinstance(text_encoder, CLIPTextModel) and isinstance(tokenizer, CLIPTokenizer)
    assert text_encoder.config.vocab_size == len(tokenizer)
    assert text_encoder.config.eos_token_id == tokenizer.eos_token_id

    # ... and the text-to-image pipeline runs with them
    torch.manual_seed(0)
    hidden = text_encoder.config.hidden_size
    unet = UNetModel(**UNET_PRESETS["unet-tiny"], sample_size=8, cross_attention_dim=hidden).eval()
    pipe = HFGenTextToImagePipeline(unet, DDIMScheduler(), text_encoder, tokenizer)
    pipe.set_progress_bar_config(disable=True)
    assert pipe("a red circle", num_inference_steps=1, output_type="pt").images.shape == (1, 3, 8, 8)


def test_train_clip_on_an_image_folder_with_labels(tmp_path):
    """A local imagefolder with captions and string labels: held-out split, class names from the labels."""
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(12):
        color = list(COLOR_RGB)[i % 3]
        solid(color, 20).save(data / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "caption": f"a {color} square", "color": color})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = [*TINY_ARGS, "--output_dir", str(out), "--train_data_dir", str(data), "--caption_column", "caption"]
    args += ["--label_column", "color", "--num_eval_images", "6", "--max_train_steps", "2", "--train_batch_size", "4"]
    with one_thread():
        report = train_clip.main(train_clip.parse_args(args))
    assert report["num_images"] == 6 and report["num_classes"] == 3 and report["chance"] == pytest.approx(1 / 3)
    assert 0 <= report["zero_shot_accuracy"] <= 1
    assert json.loads((out / "zero_shot.json").read_text())["templates"] == ["a photo of a {}.", "a {}"]


def test_train_clip_rejects_bad_arguments():
    with pytest.raises(ValueError, match="--resolution \\(30\\) must be divisible by --patch_size \\(4\\)"):
        train_clip.parse_args(["--resolution", "30"])
    with pytest.raises(ValueError, match="at most one of --dataset_name and --train_data_dir"):
        train_clip.parse_args(["--dataset_name", "x/y", "--train_data_dir", "z"])
    with pytest.raises(ValueError, match="--train_batch_size must be >= 1"):
        train_clip.parse_args(["--train_batch_size", "0"])
