"""Train a CLIP model (transformers ``CLIPModel``) on image-caption pairs with the symmetric contrastive loss.

    accelerate launch training/train_clip.py --output_dir clip-shapes --max_train_steps 2000

From scratch by default: a small ViT (patch 4 on 32x32) and a small text transformer, with a byte-level BPE tokenizer
learned from the training captions; or fine-tune a pretrained CLIP with ``--pretrained_model_name_or_path``.
The temperature is learned (logit scale starts at log(1 / 0.07) and is clamped to at most 100, as in CLIP).

Output folder:
    clip/          the full CLIPModel with its CLIPProcessor (tokenizer + image processor)
    text_encoder/  CLIPTextModelWithProjection (also loads as CLIPTextModel), for ``train_diffusion.py --text_encoder``
    tokenizer/     the CLIPTokenizer
    zero_shot.json zero-shot accuracy on held-out images (shapes: drawn with ``--eval_seed``)
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from diffusers.training_utils import EMAModel
from transformers import CLIPModel, CLIPTextModelWithProjection, CLIPTokenizer

from hfgen.clip import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    preprocess_images,
    small_clip_config,
    tokenize,
    train_clip_tokenizer,
    zero_shot_classify,
)
from hfgen.data import COLORS, SHAPE_PAIRS, SHAPES, make_shapes_dataset
from hfgen.training_utils import (
    NonFiniteGuard,
    TrainingLength,
    TransformedImages,
    UpdateLoop,
    add_run_args,
    attach_ema,
    check_resume_arg,
    checkpoint_if_due,
    checkpoint_weights,
    fused_adam,
    gather_with_grad,
    guarded_update,
    image_cache_fits,
    load_checkpoint,
    load_train_dataset,
    make_accelerator,
    start_trackers,
)

logger = get_logger(__name__)
MAX_LOGIT_SCALE = math.log(100.0)

# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model
    p.add_argument("--pretrained_model_name_or_path", default=None, help="fine-tune this CLIPModel (folder or repo)")
    p.add_argument("--tokenizer_name", default=None, help="a CLIPTokenizer to use instead of learning one")
    p.add_argument("--vocab_size", type=int, default=4096, help="upper bound of a tokenizer learned from captions")
    p.add_argument("--max_length", type=int, default=32, help="text length of a model built from scratch")
    p.add_argument("--patch_size", type=int, default=4)
    p.add_argument("--vision_width", type=int, default=128)
    p.add_argument("--vision_layers", type=int, default=4)
    p.add_argument("--text_width", type=int, default=128)
    p.add_argument("--text_layers", type=int, default=4)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--projection_dim", type=int, default=128)
    # data
    p.add_argument("--dataset_name", default=None, help="a Hub data set; default: the built-in shapes captions")
    p.add_argument("--dataset_config_name", default=None)
    p.add_argument("--train_data_dir", default=None, help="a local imagefolder with metadata.jsonl captions")
    p.add_argument("--image_column", default="image")
    p.add_argument("--caption_column", default="text")
    p.add_argument("--label_column", default=None, help="class labels of a custom data set, for zero-shot eval")
    p.add_argument("--num_shapes", type=int, default=8192, help="size of the built-in shapes training set")
    p.add_argument("--num_eval_images", type=int, default=1024, help="held-out images for zero-shot accuracy")
    p.add_argument("--eval_seed", type=int, default=12345, help="seed of the held-out shapes")
    p.add_argument("--resolution", type=int, default=32, help="image size of a model built from scratch")
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    p.add_argument("--cache_dir", default=None)
    # optimisation
    p.add_argument("--train_batch_size", type=int, default=128)
    p.add_argument("--num_epochs", type=int, default=100)
    p.add_argument("--max_train_steps", type=int, default=None, help="overrides num_epochs")
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.98)
    p.add_argument("--adam_epsilon", type=float, default=1e-6)
    p.add_argument("--lr_scheduler", default="cosine")
    p.add_argument("--lr_warmup_steps", type=int, default=100)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--use_ema", action="store_true", help="save an exponential moving average of the weights")
    p.add_argument("--ema_decay", type=float, default=0.999)
    add_run_args(p, output_dir="clip-model")
    args = p.parse_args(argv)

    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ValueError("give at most one of --dataset_name and --train_data_dir")
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_epochs", "resolution", "max_length"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError(f"--max_train_steps must be >= 1, got {args.max_train_steps}")
    if args.resolution % args.patch_size:
        raise ValueError(f"--resolution ({args.resolution}) must be divisible by --patch_size ({args.patch_size})")
    check_resume_arg(args.resume_from_checkpoint)
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


def contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """
    Symmetric InfoNCE of CLIP (Radford et al. 2021, Fig. 3): image i matches text i of the batch.

    :param logits_per_image: (B, B) = exp(logit_scale) * cos(image_i, text_j); rows images, columns texts.
    """
    targets = torch.arange(len(logits_per_image), device=logits_per_image.device)
    image_to_text = F.cross_entropy(logits_per_image, targets)
    text_to_image = F.cross_entropy(logits_per_image.T, targets)
    return (image_to_text + text_to_image) / 2


def load_data(args) -> tuple:
    """(train set, held-out set or None, class names or None, templates) with columns image / text (/ label)."""
    dataset = load_train_dataset(args, args.num_shapes, args.caption_column, args.label_column)
    if args.dataset_name is None and args.train_data_dir is None:
        held_out = make_shapes_dataset(num_images=args.num_eval_images, image_size=args.resolution, seed=args.eval_seed)
        return dataset, held_out, [f"{c} {s}" for c, s in SHAPE_PAIRS], ("a {}",)
    if args.label_column is None or args.num_eval_images == 0:
        return dataset, None, None, ()
    split = dataset.train_test_split(test_size=args.num_eval_images, seed=args.seed)
    label_feature = dataset.features["label"]
    if hasattr(label_feature, "names"):
        class_names = list(label_feature.names)
    else:
        class_names = sorted({str(v) for v in dataset["label"]})
        split["test"] = split["test"].map(lambda ex: {"label": class_names.index(str(ex["label"]))})
    return split["train"], split["test"], class_names, ("a photo of a {}.", "a {}")


def zero_shot_report(model, tokenizer, held_out, class_names, templates) -> dict:
    """Zero-shot accuracy on the held-out set; for shapes also the colour and shape accuracy of the predicted pair."""
    model.eval()
    predictions = []
    for i in range(0, len(held_out), 256):
        batch = held_out[i : i + 256]
        predictions.append(zero_shot_classify(model, tokenizer, batch["image"], class_names, templates).predictions)
    predictions = torch.cat(predictions).cpu()
    labels = torch.tensor(held_out["label"])
    report = {
        "zero_shot_accuracy": (predictions == labels).float().mean().item(),
        "chance": 1 / len(class_names),
        "num_images": len(held_out),
        "num_classes": len(class_names),
        "templates": list(templates),
    }
    if class_names == [f"{c} {s}" for c, s in SHAPE_PAIRS]:
        report["color_accuracy"] = (predictions // len(SHAPES) == labels // len(SHAPES)).float().mean().item()
        report["shape_accuracy"] = (predictions % len(SHAPES) == labels % len(SHAPES)).float().mean().item()
        report["color_chance"], report["shape_chance"] = 1 / len(COLORS), 1 / len(SHAPES)
    return report


def save_text_encoder(model: CLIPModel, folder: str | os.PathLike) -> None:
    """The text tower with its projection as a CLIPTextModelWithProjection (also loadable by CLIPTextModel)."""
    text_config = model.config.text_config
    text_config.projection_dim = model.config.projection_dim
    text_encoder = CLIPTextModelWithProjection(text_config)
    text_encoder.text_model.load_state_dict(model.text_model.state_dict())
    text_encoder.text_projection.load_state_dict(model.text_projection.state_dict())
    text_encoder.save_pretrained(folder)


def save_image_processor_config(folder: str | os.PathLike, image_size: int) -> None:
    """``preprocessor_config.json`` of a CLIP image processor matching ``hfgen.clip.preprocess_images``."""
    config = {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "do_convert_rgb": True,
    }
    Path(folder, "preprocessor_config.json").write_text(json.dumps(config, indent=2))


# ----------------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------------


def pretrained_path(args) -> str | None:
    """``--pretrained_model_name_or_path``, pointed at its clip/ subfolder when it is this script's output."""
    path = args.pretrained_model_name_or_path
    if path and os.path.isdir(os.path.join(path, "clip")):
        return os.path.join(path, "clip")
    return path


def load_tokenizer(args, captions: list[str]) -> CLIPTokenizer:
    """Pretrained (``--tokenizer_name`` or the pretrained model's), the one a resumed run saved in output_dir, or
    learned from the training captions."""
    saved = os.path.join(args.output_dir, "tokenizer")
    if args.tokenizer_name or pretrained_path(args):
        return CLIPTokenizer.from_pretrained(args.tokenizer_name or pretrained_path(args))
    if args.resume_from_checkpoint and os.path.isfile(os.path.join(saved, "tokenizer_config.json")):
        return CLIPTokenizer.from_pretrained(saved)
    return train_clip_tokenizer(captions, vocab_size=args.vocab_size, model_max_length=args.max_length)


def build_clip(args, tokenizer) -> CLIPModel:
    """The pretrained CLIP, or a small one of the size flags for the tokenizer's vocabulary."""
    if args.pretrained_model_name_or_path:
        return CLIPModel.from_pretrained(pretrained_path(args))
    config = small_clip_config(
        tokenizer,
        image_size=args.resolution,
        patch_size=args.patch_size,
        vision_width=args.vision_width,
        vision_layers=args.vision_layers,
        text_width=args.text_width,
        text_layers=args.text_layers,
        num_heads=args.num_heads,
        projection_dim=args.projection_dim,
    )
    return CLIPModel(config)


def make_optimizer(model: CLIPModel, args) -> torch.optim.Optimizer:
    """AdamW without weight decay on gains, biases, positional embeddings and the temperature (CLIP, Sec. 2.5)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "position_embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "position_embedding" not in n)]
    return fused_adam(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )


def save_outputs(args, model: CLIPModel, tokenizer, image_size: int) -> None:
    """clip/ (model, tokenizer, image processor config), text_encoder/ (the conditioning encoder) and tokenizer/."""
    clip_dir = os.path.join(args.output_dir, "clip")
    model.save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    save_image_processor_config(clip_dir, image_size)
    save_text_encoder(model, os.path.join(args.output_dir, "text_encoder"))
    tokenizer.save_pretrained(os.path.join(args.output_dir, "tokenizer"))


def evaluate(model: CLIPModel, tokenizer, held_out, class_names, templates) -> dict:
    """Zero-shot accuracy on the held-out images, or a note saying why there is none."""
    if held_out is None:
        return {
            "zero_shot_accuracy": None,
            "note": "no held-out labels: pass --label_column to measure zero-shot accuracy",
        }
    report = zero_shot_report(model, tokenizer, held_out, class_names, templates)
    logger.info(f"zero-shot accuracy {report['zero_shot_accuracy']:.3f} (chance {report['chance']:.3f})")
    return report


class CaptionedImages(torch.utils.data.Dataset):
    """Index -> {"text": caption, "pixel_values": (3, S, S) CLIP-normalised}. The preprocessing (resize, centre crop,
    normalise) is deterministic, so each image is kept after its first epoch when the set fits in memory
    (``image_cache_fits``)."""

    def __init__(self, dataset, image_size: int, num_workers: int = 0):
        self.texts, self.image_size = list(dataset["text"]), image_size
        keep = image_cache_fits(len(dataset), 3 * image_size**2, num_workers)
        self.pixel_values = TransformedImages(dataset, self.preprocess, keep)

    def preprocess(self, image) -> torch.Tensor:
        return preprocess_images([image], self.image_size)[0]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        return {"text": self.texts[i], "pixel_values": self.pixel_values(i)}


def make_loader(args, train_set, tokenizer, image_size: int, max_length: int) -> torch.utils.data.DataLoader:
    """Batches of tokenized captions (``input_ids``, ``attention_mask``, padded to the batch's longest caption: the
    text features at the end-of-text token are those of a full-length padding, since the text model is causal) and
    their images (``pixel_values`` (B, 3, S, S), CLIP-normalised)."""

    def collate(examples: list[dict]) -> dict:
        batch = tokenize(tokenizer, [ex["text"] for ex in examples], max_length, padding="longest")
        batch["pixel_values"] = torch.stack([ex["pixel_values"] for ex in examples])  # (B, 3, S, S)
        return batch

    return torch.utils.data.DataLoader(
        CaptionedImages(train_set, image_size, args.dataloader_num_workers),
        batch_size=args.train_batch_size,
        shuffle=True,
        drop_last=len(train_set) >= args.train_batch_size,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
    )


def global_batch_loss(accelerator, model, clip: CLIPModel, batch: dict) -> torch.Tensor:
    """The symmetric contrastive loss over the global batch: N = num_processes x B pairs, the same loss on every
    rank; the forward runs through the prepared ``model``, the temperature is read from its unwrapped ``clip``."""
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]
    )
    image_embeds = gather_with_grad(accelerator, out.image_embeds)  # (N, D), unit norm
    text_embeds = gather_with_grad(accelerator, out.text_embeds)  # (N, D), unit norm
    return contrastive_loss(clip.logit_scale.exp() * image_embeds @ text_embeds.T)  # (N, N) -> ()


def train_loop(args, accelerator, model, optimizer, lr_scheduler, loader, length, ema) -> tuple[int, float, int]:
    """Train from the resumed step to ``max_train_steps``; returns (last step, last loss, skipped updates)."""
    global_step, script_state = load_checkpoint(accelerator, args.resume_from_checkpoint, args.output_dir)
    guard = NonFiniteGuard(accelerator, args.max_nonfinite_steps, script_state)  # the count survives a resume
    loop = UpdateLoop(accelerator, loader, length, global_step, args.gradient_accumulation_steps)
    clip = accelerator.unwrap_model(model)
    loss_value = float("nan")
    model.train()
    for _, _, batch in loop:
        with accelerator.accumulate(model):
            loss = global_batch_loss(accelerator, model, clip, batch)
            guarded_update(accelerator, guard, loss, optimizer, model.parameters(), args.max_grad_norm, lr_scheduler)
            with torch.no_grad():  # temperature at most 1 / 100 (CLIP, Sec. 2.5)
                clip.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        if not loop.updated():
            continue
        guard.end_update(loop.global_step, ema, clip)
        loss_value = loss.detach().item()
        loop.show({"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0], "logit_scale": clip.logit_scale.item()})
        checkpoint_if_due(accelerator, args, loop.global_step, guard, lambda: checkpoint_weights(clip, ema=ema))
    return loop.global_step, loss_value, guard.skipped


def push_folder(args) -> None:
    """Upload ``--output_dir`` (without its checkpoints and logs) to ``--hub_model_id`` (default: the folder's name)."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(args.hub_model_id or Path(args.output_dir).name, exist_ok=True).repo_id
    upload_folder(repo_id=repo_id, folder_path=args.output_dir, ignore_patterns=["checkpoint-*", "logs/*"])


def main(args: argparse.Namespace) -> dict:
    """Train, save clip/ text_encoder/ tokenizer/ and zero_shot.json in ``args.output_dir``; return the report."""
    accelerator = make_accelerator(args)  # data order = f(seed, epoch)
    train_set, held_out, class_names, templates = load_data(args)

    # the tokenizer is kept in output_dir, so that a resumed run reuses it
    tokenizer = load_tokenizer(args, train_set["text"])
    if accelerator.is_main_process:
        tokenizer.save_pretrained(os.path.join(args.output_dir, "tokenizer"))
    model = build_clip(args, tokenizer)
    image_size = model.config.vision_config.image_size
    max_length = min(tokenizer.model_max_length, model.config.text_config.max_position_embeddings)
    ema = EMAModel(model.parameters(), decay=args.ema_decay) if args.use_ema else None
    loader = make_loader(args, train_set, tokenizer, image_size, max_length)
    optimizer = make_optimizer(model, args)
    length = TrainingLength.of(accelerator, loader, args)
    lr_scheduler = length.lr_scheduler(args, optimizer, accelerator.num_processes)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    if ema is not None:
        attach_ema(accelerator, ema)  # on the device, saved in the checkpoints as safetensors
    start_trackers(accelerator, args, "train_clip")
    logger.info(f"{len(train_set)} pairs, {length.max_train_steps} steps of batch {args.train_batch_size}")

    global_step, loss_value, skipped = train_loop(
        args, accelerator, model, optimizer, lr_scheduler, loader, length, ema
    )

    # save clip/, text_encoder/, tokenizer/, then zero-shot on held-out images
    accelerator.wait_for_everyone()
    report = {"steps": global_step, "final_loss": loss_value, "skipped_steps": skipped}
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if ema is not None:
            ema.copy_to(unwrapped.parameters())
        save_outputs(args, unwrapped, tokenizer, image_size)
        report.update(evaluate(unwrapped, tokenizer, held_out, class_names, templates))
        Path(args.output_dir, "zero_shot.json").write_text(json.dumps(report, indent=2))
        if args.push_to_hub:
            push_folder(args)
    accelerator.end_training()
    return report


if __name__ == "__main__":
    main(parse_args())
