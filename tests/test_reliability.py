"""Reliability: bad input gets a short, specific error; loading never runs code from files; same seed, same images.

1. One table of every public entry point against bad values: each row must raise the given ValueError / TypeError
   with a message that names the argument, the value and what is accepted.
2. Safe loading: weights are safetensors; a pickle carrying code is refused; missing, truncated or mismatched weights
   name the file; a Hub repository's code runs only with ``trust_remote_code=True``; training checkpoints hold no
   pickles that are read unsafely.
3. Reproducibility: image i depends only on generator i, whatever the batch; noise is drawn on the CPU.
"""

import functools
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.utils import load as accelerate_load
from diffusers import DDPMScheduler as DiffusersDDPMScheduler
from diffusers import DiffusionPipeline
from diffusers.training_utils import EMAModel
from PIL import Image
from safetensors.torch import load_file
from tiny_clip import make_tiny_clip_tokenizer, make_tiny_text_encoder
from tolerances import assert_close_float32

from hfgen import (
    AUTOENCODER_PRESETS,
    DIT_PRESETS,
    GAN_PRESETS,
    RIN_PRESETS,
    UNET_PRESETS,
    AutoencoderModel,
    DDIMScheduler,
    DDPMScheduler,
    DiTModel,
    GANDiscriminator,
    GANGenerator,
    RINModel,
    UNetModel,
    VAEModel,
)
from hfgen.loading import load_ema_state, save_ema_state
from hfgen.pipelines import HFGenGANPipeline, HFGenPipeline, HFGenTextToImagePipeline, HFGenVAEPipeline
from hfgen.training import train_autoencoder, train_clip, train_diffusion, train_gan

T = 10  # num_train_timesteps of every tiny scheduler
TEXT_DIM = 32

# ----------------------------------------------------------------------------------------------------------------------
# Tiny components (built once, in eval mode; nothing in the table mutates them)
# ----------------------------------------------------------------------------------------------------------------------


# one torch thread: conftest.py sets it for the whole session (tiny models run fastest on one)


def _tiny(factory):
    @functools.cache
    def build():
        torch.manual_seed(0)
        return factory()

    return build


unet = _tiny(lambda: UNetModel(**UNET_PRESETS["unet-tiny"], sample_size=8).eval())  # downsample_factor 2
unet_cls = _tiny(lambda: UNetModel(**UNET_PRESETS["unet-tiny"], sample_size=8, num_classes=3).eval())
dit = _tiny(lambda: DiTModel(**DIT_PRESETS["DiT-tiny/2"], sample_size=8, num_classes=3).eval())
rin = _tiny(lambda: RINModel(**RIN_PRESETS["RIN-tiny"], sample_size=8, num_classes=3).eval())
ae = _tiny(lambda: AutoencoderModel(**AUTOENCODER_PRESETS["ae-tiny"], sample_size=8).eval())  # f = 4
vae = _tiny(lambda: VAEModel(**AUTOENCODER_PRESETS["ae-tiny"], sample_size=8).eval())
gan_g = _tiny(lambda: GANGenerator(**GAN_PRESETS["dcgan-tiny"][0], sample_size=8).eval())
gan_g_cls = _tiny(lambda: GANGenerator(**GAN_PRESETS["dcgan-tiny"][0], sample_size=8, num_classes=3).eval())
gan_d = _tiny(lambda: GANDiscriminator(**GAN_PRESETS["dcgan-tiny"][1], sample_size=8, num_classes=3).eval())


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


pipe = _tiny(lambda: _quiet(HFGenPipeline(denoiser=unet(), scheduler=DDPMScheduler(num_train_timesteps=T))))
pipe_cls = _tiny(lambda: _quiet(HFGenPipeline(denoiser=unet_cls(), scheduler=DDIMScheduler(num_train_timesteps=T))))
vae_pipe = _tiny(lambda: _quiet(HFGenVAEPipeline(vae=vae())))
gan_pipe = _tiny(lambda: _quiet(HFGenGANPipeline(generator=gan_g())))
gan_pipe_cls = _tiny(lambda: _quiet(HFGenGANPipeline(generator=gan_g_cls())))


@functools.cache
def text_parts():
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = make_tiny_clip_tokenizer(folder, model_max_length=8)
    return tokenizer, make_tiny_text_encoder(tokenizer, hidden_size=TEXT_DIM)


@functools.cache
def t2i():
    tokenizer, text_encoder = text_parts()
    torch.manual_seed(0)
    denoiser = UNetModel(**UNET_PRESETS["unet-tiny"], sample_size=8, cross_attention_dim=TEXT_DIM).eval()
    scheduler = DDIMScheduler(num_train_timesteps=T)
    return _quiet(HFGenTextToImagePipeline(denoiser, scheduler, text_encoder=text_encoder, tokenizer=tokenizer))


def x(*shape) -> torch.Tensor:
    return torch.zeros(*shape)


def gens(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(i) for i in range(n)]


# ----------------------------------------------------------------------------------------------------------------------
# Data folders and training command lines
# ----------------------------------------------------------------------------------------------------------------------


def image_folder(root: Path, kind: str = "good") -> str:
    """An imagefolder of four 8x8 PNGs with metadata.jsonl (text, label); "empty": no files; "corrupt": one PNG
    that is not an image."""
    folder = root / f"data-{kind}"
    folder.mkdir()
    if kind == "empty":
        return str(folder)
    rows = []
    for i in range(4):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": "a red circle", "label": i % 2})
    if kind == "corrupt":
        (folder / "3.png").write_bytes(b"this is not a png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder)


DIFFUSION = ["--model", "unet", "--model_config", "unet-tiny", "--resolution", "8", "--train_batch_size", "2",
             "--max_train_steps", "1", "--report_to", "none", "--num_inference_steps", "2",
             "--num_validation_images", "2"]  # fmt: skip
AUTOENCODER = ["--model", "ae", "--preset", "ae-tiny", "--resolution", "8", "--num_shapes", "4",
               "--train_batch_size", "2", "--max_train_steps", "1", "--report_to", "none"]  # fmt: skip
GAN = ["--preset", "dcgan-tiny", "--resolution", "8", "--num_shapes", "4", "--train_batch_size", "2",
       "--max_train_steps", "1", "--report_to", "none", "--bn_calibration_batches", "1"]  # fmt: skip
CLIP = ["--resolution", "8", "--patch_size", "4", "--vision_width", "16", "--vision_layers", "1", "--text_width", "16",
        "--text_layers", "1", "--num_heads", "2", "--projection_dim", "8", "--max_length", "8", "--num_shapes", "4",
        "--num_eval_images", "4", "--train_batch_size", "2", "--max_train_steps", "1", "--report_to", "none"]  # fmt: skip
SCRIPTS = {"diffusion": (train_diffusion, DIFFUSION), "autoencoder": (train_autoencoder, AUTOENCODER),
           "gan": (train_gan, GAN), "clip": (train_clip, CLIP)}  # fmt: skip


def train(script: str, tmp: Path, *extra: str):
    module, base = SCRIPTS[script]
    module.main(module.parse_args([*base, "--output_dir", str(tmp / "out"), *extra]))


def _data_rows():
    """Missing column, empty data set, unreadable image, missing checkpoint: for every training script."""
    column = {"diffusion": ("--conditioning", "class", "--label_column", "nope"), "autoencoder": ("--image_column",
              "nope"), "gan": ("--class_conditional", "--label_column", "nope"), "clip": ("--caption_column", "nope")}  # fmt: skip
    extra = {"diffusion": ("--conditioning", "class"), "gan": ("--class_conditional", "--label_column", "label")}
    rows = []
    for s in SCRIPTS:
        rows += [
            R(
                f"train_{s}-missing-column",
                lambda tmp, s=s: train(s, tmp, "--train_data_dir", image_folder(tmp), *column[s]),
                ValueError,
                r"_column 'nope' is not a column of the data set; its columns are \[",
            ),
            R(
                f"train_{s}-empty-data",
                lambda tmp, s=s: train(s, tmp, "--train_data_dir", image_folder(tmp, "empty")),
                ValueError,
                r"train_data_dir '.*data-empty' contains no images",
            ),
            R(
                f"train_{s}-unreadable-image",
                lambda tmp, s=s: train(s, tmp, "--train_data_dir", image_folder(tmp, "corrupt"), *extra.get(s, ())),
                ValueError,
                r"cannot read image .*3\.png",
            ),
            R(
                f"train_{s}-resume-missing",
                lambda tmp, s=s: train(s, tmp, "--resume_from_checkpoint", str(tmp / "checkpoint-7")),
                ValueError,
                r"--resume_from_checkpoint '.*checkpoint-7'",
            ),
        ]
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# 1. The table: (entry point, bad call, exception type, message regex)
# ----------------------------------------------------------------------------------------------------------------------


def R(id_: str, call, exc: type[Exception], match: str):
    """One row; ``call`` takes ``tmp_path`` (used by the training rows) or nothing."""
    return pytest.param(call, exc, match, id=id_)


def t2i_call(**kwargs):
    return t2i()(**{"prompt": "a red circle", "num_inference_steps": 1, "output_type": "pt", **kwargs})


def pipe_call(p, **kwargs):
    return p(**{"num_inference_steps": 1, "output_type": "pt", **kwargs})


ROWS = [
    # --- denoisers: rank, channels, size, timesteps, labels, text ---------------------------------------------------
    R("unet-rank", lambda: unet()(x(3, 8, 8), 1), ValueError, r"sample must have shape \(B, C, H, W\), got rank 3"),
    R("unet-channels", lambda: unet()(x(1, 4, 8, 8), 1), ValueError, r"sample has 4 channels.*in_channels is 3"),
    R("unet-size", lambda: unet()(x(1, 3, 7, 7), 1), ValueError, r"divisible by 2 .*got 7x7"),
    R("unet-timestep-negative", lambda: unet()(x(1, 3, 8, 8), -1), ValueError, r"timestep must be .*>= 0, got \[-1"),
    R("unet-timestep-nan", lambda: unet()(x(1, 3, 8, 8), float("nan")), ValueError, r"timestep must be finite"),
    R(
        "unet-timestep-count",
        lambda: unet()(x(2, 3, 8, 8), torch.tensor([1, 2, 3])),
        ValueError,
        r"timestep must be a scalar or have one value per sample \(2\), got 3",
    ),
    R("unet-timestep-type", lambda: unet()(x(1, 3, 8, 8), "1"), TypeError, r"timestep must be a number or a tensor"),
    R(
        "unet-labels-unconditional",
        lambda: unet()(x(1, 3, 8, 8), 1, class_labels=torch.tensor([0])),
        ValueError,
        r"class_labels were given but the model is unconditional",
    ),
    R(
        "unet-labels-range",
        lambda: unet_cls()(x(1, 3, 8, 8), 1, class_labels=torch.tensor([4])),
        ValueError,
        r"class_labels must be in \[0, 3\].*got \[4\]",
    ),
    R(
        "unet-labels-float",
        lambda: unet_cls()(x(1, 3, 8, 8), 1, class_labels=torch.tensor([0.5])),
        TypeError,
        r"class_labels must be integers, got dtype torch.float32",
    ),
    R(
        "unet-text-without-cross-attention",
        lambda: unet()(x(1, 3, 8, 8), 1, encoder_hidden_states=x(1, 2, 8)),
        ValueError,
        r"encoder_hidden_states were given but the model has no text conditioning",
    ),
    R("dit-rank", lambda: dit()(x(3, 8, 8), 1), ValueError, r"sample must have shape \(B, C, H, W\), got rank 3"),
    R("dit-channels", lambda: dit()(x(1, 1, 8, 8), 1), ValueError, r"sample has 1 channels.*in_channels is 3"),
    R("dit-patch", lambda: dit()(x(1, 3, 9, 9), 1), ValueError, r"divisible by 2 .*got 9x9"),
    R("dit-timestep", lambda: dit()(x(1, 3, 8, 8), -3.0), ValueError, r"timestep must be .*>= 0, got \[-3"),
    R(
        "dit-labels-range",
        lambda: dit()(x(2, 3, 8, 8), 1, class_labels=torch.tensor([0, -1])),
        ValueError,
        r"class_labels must be in \[0, 3\].*got \[0, -1\]",
    ),
    R("rin-rank", lambda: rin()(x(8, 8), 1), ValueError, r"sample must have shape \(B, C, H, W\), got rank 2"),
    R("rin-channels", lambda: rin()(x(1, 2, 8, 8), 1), ValueError, r"sample has 2 channels.*in_channels is 3"),
    R("rin-patch", lambda: rin()(x(1, 3, 7, 7), 1), ValueError, r"divisible by 2 .*got 7x7"),
    R("rin-size", lambda: rin()(x(1, 3, 4, 4), 1), ValueError, r"sample must be 8x8 .*got 4x4"),
    R(
        "rin-labels-range",
        lambda: rin()(x(1, 3, 8, 8), 1, class_labels=torch.tensor([9])),
        ValueError,
        r"class_labels must be in \[0, 3\].*got \[9\]",
    ),
    R(
        "rin-prev-latents",
        lambda: rin()(x(1, 3, 8, 8), 1, prev_latents=x(1, 3, 32)),
        ValueError,
        r"prev_latents must have shape \(1, 8, 32\), got \(1, 3, 32\)",
    ),
    # --- autoencoders -----------------------------------------------------------------------------------------------
    R("ae-encode-rank", lambda: ae().encode(x(3, 8, 8)), ValueError, r"sample must have shape \(B, C, H, W\)"),
    R("ae-encode-channels", lambda: ae().encode(x(1, 1, 8, 8)), ValueError, r"sample has 1 channels.*in_channels"),
    R("ae-encode-size", lambda: ae().encode(x(1, 3, 6, 6)), ValueError, r"divisible by 4, got 6x6"),
    R("ae-decode-channels", lambda: ae().decode(x(1, 3, 2, 2)), ValueError, r"z has 3 channels.*latent_channels is 4"),
    R("vae-encode-type", lambda: vae().encode(np.zeros((1, 3, 8, 8))), TypeError, r"sample must be a torch.Tensor"),
    R("vae-decode-rank", lambda: vae().decode(x(4, 2, 2)), ValueError, r"z must be a tensor of shape \(B, 4, h, w\)"),
    R("vae-forward-size", lambda: vae()(x(1, 3, 10, 10)), ValueError, r"divisible by 4, got 10x10"),
    # --- GAN --------------------------------------------------------------------------------------------------------
    R("gan-g-latent-width", lambda: gan_g()(x(2, 5)), ValueError, r"latents must have shape \(B, 16\).*got \(2, 5\)"),
    R("gan-g-rank", lambda: gan_g()(x(2, 16, 1, 1)), ValueError, r"latents must have shape \(B, 16\)"),
    R("gan-g-labels-missing", lambda: gan_g_cls()(x(2, 16)), ValueError, r"class_labels are required.*num_classes=3"),
    R(
        "gan-g-labels-range",
        lambda: gan_g_cls()(x(2, 16), torch.tensor([0, 3])),
        ValueError,
        r"class_labels must be in \[0, 2\], got \[0, 3\]",
    ),
    R("gan-d-rank", lambda: gan_d()(x(3, 8, 8)), ValueError, r"sample must have shape \(B, C, H, W\)"),
    R("gan-d-channels", lambda: gan_d()(x(1, 1, 8, 8), torch.tensor([0])), ValueError, r"sample has 1 channels"),
    R("gan-d-size", lambda: gan_d()(x(1, 3, 16, 16), torch.tensor([0])), ValueError, r"must be 8x8.*got 16x16"),
    R(
        "gan-d-labels-range",
        lambda: gan_d()(x(1, 3, 8, 8), torch.tensor([-1])),
        ValueError,
        r"class_labels must be in \[0, 2\], got \[-1\]",
    ),
    # --- schedulers -------------------------------------------------------------------------------------------------
    R(
        "ddpm-beta-schedule",
        lambda: DDPMScheduler(beta_schedule="cosine-ish"),
        ValueError,
        r"beta_schedule must be one of .*got 'cosine-ish'",
    ),
    R(
        "ddim-prediction-type",
        lambda: DDIMScheduler(prediction_type="eps"),
        ValueError,
        r"prediction_type must be one of .*got 'eps'",
    ),
    R(
        "ddpm-steps-range",
        lambda: DDPMScheduler(num_train_timesteps=T).set_timesteps(T + 1),
        ValueError,
        r"num_inference_steps must be in \[1, num_train_timesteps=10\], got 11",
    ),
    R(
        "ddim-custom-timesteps-range",
        lambda: DDIMScheduler(num_train_timesteps=T).set_timesteps(timesteps=[12, 3]),
        ValueError,
        r"timesteps must lie in \[0, 9\].*got \[12, 3\]",
    ),
    R(
        "ddpm-step-timestep-range",
        lambda: DDPMScheduler(num_train_timesteps=T).step(x(1, 3, 4, 4), 10, x(1, 3, 4, 4)),
        ValueError,
        r"timestep must be in \[0, 9\] \(num_train_timesteps=10\), got 10",
    ),
    R(
        "ddim-step-timestep-range",
        lambda: DDIMScheduler(num_train_timesteps=T).step(x(1, 3, 4, 4), -1, x(1, 3, 4, 4)),
        ValueError,
        r"timestep must be in \[0, 9\] \(num_train_timesteps=10\), got -1",
    ),
    R(
        "ddpm-step-channels",
        lambda: DDPMScheduler(num_train_timesteps=T).step(x(1, 4, 4, 4), 9, x(1, 3, 4, 4)),
        ValueError,
        r"model_output must have 3 channels like sample, got 4",
    ),
    R(
        "ddim-step-channels",
        lambda: DDIMScheduler(num_train_timesteps=T).step(x(1, 4, 4, 4), 9, x(1, 3, 4, 4)),
        ValueError,
        r"model_output must have .*shape .*\(1, 3, 4, 4\).*got \(1, 4, 4, 4\)",
    ),
    R(
        "ddpm-add-noise-range",
        lambda: DDPMScheduler(num_train_timesteps=T).add_noise(x(2, 3), x(2, 3), torch.tensor([0, 10])),
        ValueError,
        r"timestep must be in \[0, 9\].*got 0\.\.10",
    ),
    R(
        "ddim-add-noise-float",
        lambda: DDIMScheduler(num_train_timesteps=T).add_noise(x(2, 3), x(2, 3), torch.tensor([0.5, 1.0])),
        TypeError,
        r"timesteps must be integers, got dtype torch.float32",
    ),
    # --- HFGenPipeline ----------------------------------------------------------------------------------------------
    R(
        "pipe-generator-list",
        lambda: pipe_call(pipe(), batch_size=3, generator=gens(2)),
        ValueError,
        r"generator is a list of 2 generators, but batch_size is 3",
    ),
    R(
        "pipe-output-type",
        lambda: pipe_call(pipe(), output_type="tensor"),
        ValueError,
        r"output_type must be one of \('pil', 'np', 'pt', 'latent'\), got 'tensor'",
    ),
    R(
        "pipe-guidance-unconditional",
        lambda: pipe_call(pipe(), guidance_scale=3.0),
        ValueError,
        r"guidance_scale=3.0 needs class_labels and a class-conditional denoiser \(config.num_classes=None\)",
    ),
    R(
        "pipe-labels-unconditional",
        lambda: pipe_call(pipe(), class_labels=1),
        ValueError,
        r"class_labels were given \(1\) but the denoiser is unconditional",
    ),
    R(
        "pipe-labels-range",
        lambda: pipe_call(pipe_cls(), batch_size=2, class_labels=[0, 3]),
        ValueError,
        r"class_labels must be in \[0, 2\] \(num_classes=3\)",
    ),
    R(
        "pipe-labels-count",
        lambda: pipe_call(pipe_cls(), batch_size=2, class_labels=[0, 1, 2]),
        ValueError,
        r"class_labels must be one int or 2 labels \(batch_size\), got 3",
    ),
    R(
        "pipe-latents-shape",
        lambda: pipe_call(pipe(), latents=x(1, 3, 4, 4)),
        ValueError,
        r"latents must have shape \(1, 3, 8, 8\).*got \(1, 3, 4, 4\)",
    ),
    R("pipe-batch-size", lambda: pipe_call(pipe(), batch_size=0), ValueError, r"batch_size must be an int >= 1, got 0"),
    R(
        "pipe-invert-channels",
        lambda: pipe().invert(x(1, 1, 8, 8), num_inference_steps=1),
        ValueError,
        r"images must have 3 channels \(the model's in_channels\), got shape \(1, 1, 8, 8\)",
    ),
    R(
        "pipe-invert-numpy-range",
        lambda: pipe().invert(np.full((1, 8, 8, 3), 255.0, np.float32), num_inference_steps=1),
        ValueError,
        r"float numpy images must be in \[0, 1\], got values in \[255, 255\]",
    ),
    R(
        "pipe-learned-variance-without-learned-sigma",
        lambda: pipe_call(_quiet(HFGenPipeline(unet(), DiffusersDDPMScheduler(variance_type="learned_range")))),
        ValueError,
        r"variance_type='learned_range' reads a learned variance, but the denoiser returns 3 channels",
    ),
    R(
        "pipe-steps",
        lambda: pipe_call(pipe(), num_inference_steps=T + 5),
        ValueError,
        r"num_inference_steps must be in \[1, num_train_timesteps=10\], got 15",
    ),
    # --- HFGenTextToImagePipeline -----------------------------------------------------------------------------------
    R(
        "t2i-denoiser-without-text",
        lambda: HFGenTextToImagePipeline(unet(), DDIMScheduler(), *reversed(text_parts())),
        ValueError,
        r"cross_attention_dim \(None\) must equal the text encoder's hidden_size \(32\)",
    ),
    R(
        "t2i-generator-list",
        lambda: t2i_call(prompt=["a", "b"], generator=gens(3)),
        ValueError,
        r"generator is a list of 3 generators, but 2 images are asked for",
    ),
    R("t2i-output-type", lambda: t2i_call(output_type="PIL"), ValueError, r"output_type must be one of .*got 'PIL'"),
    R("t2i-size", lambda: t2i_call(height=7), ValueError, r"height and width must be positive multiples of 2.*got 7x8"),
    R(
        "t2i-prompt-type",
        lambda: t2i_call(prompt=3),
        TypeError,
        r"prompt must be a string or a list of strings, got int",
    ),
    R("t2i-guidance", lambda: t2i_call(guidance_scale=0.5), ValueError, r"guidance_scale must be >= 1.*got 0.5"),
    R("t2i-guidance-type", lambda: t2i_call(guidance_scale="3"), ValueError, r"guidance_scale must be a number.*'3'"),
    R("t2i-height-float", lambda: t2i_call(height=8.0), ValueError, r"height must be an int >= 1, got 8.0"),
    R(
        "t2i-images-per-prompt-bool",
        lambda: t2i_call(num_images_per_prompt=True),
        ValueError,
        r"num_images_per_prompt must be an int >= 1, got True",
    ),
    R(
        "t2i-embeds-width",
        lambda: t2i_call(prompt=None, prompt_embeds=x(1, 8, 5)),
        ValueError,
        r"prompt_embeds must have shape \(B, L, 32\), got \(1, 8, 5\)",
    ),
    # --- HFGenVAEPipeline -------------------------------------------------------------------------------------------
    R(
        "vae-pipe-generator-list",
        lambda: vae_pipe()(batch_size=3, generator=gens(2), output_type="pt"),
        ValueError,
        r"generator is a list of 2 generators, but batch_size is 3",
    ),
    R(
        "vae-pipe-generator-list-of-one",
        lambda: vae_pipe()(batch_size=3, generator=gens(1), output_type="pt"),
        ValueError,
        r"generator is a list of 1 generators, but batch_size is 3",
    ),
    R("vae-pipe-output-type", lambda: vae_pipe()(output_type="jpg"), ValueError, r"output_type must be one of .*'jpg'"),
    R(
        "vae-pipe-batch-float",
        lambda: vae_pipe()(batch_size=1.5),
        ValueError,
        r"batch_size must be an int >= 1, got 1.5",
    ),
    R(
        "vae-pipe-latents",
        lambda: vae_pipe()(latents=x(1, 3, 2, 2)),
        ValueError,
        r"latents must have shape \(B, 4, h, w\), got \(1, 3, 2, 2\)",
    ),
    R(
        "vae-pipe-reconstruct-size",
        lambda: vae_pipe().reconstruct(x(1, 3, 6, 6), output_type="pt"),
        ValueError,
        r"divisible by 4, got 6x6",
    ),
    R(
        "vae-pipe-interpolate-steps",
        lambda: vae_pipe().interpolate(x(1, 3, 8, 8), x(1, 3, 8, 8), num_steps=1),
        ValueError,
        r"num_steps must be >= 2, got 1",
    ),
    # --- HFGenGANPipeline -------------------------------------------------------------------------------------------
    R(
        "gan-pipe-generator-list",
        lambda: gan_pipe()(batch_size=3, generator=gens(4), output_type="pt"),
        ValueError,
        r"generator is a list of 4 generators, but batch_size is 3",
    ),
    R("gan-pipe-output-type", lambda: gan_pipe()(output_type="tensor"), ValueError, r"output_type must be one of"),
    R(
        "gan-pipe-labels-unconditional",
        lambda: gan_pipe()(class_labels=1),
        ValueError,
        r"class_labels were given but the generator is unconditional",
    ),
    R(
        "gan-pipe-labels-range",
        lambda: gan_pipe_cls()(batch_size=2, class_labels=[1, 3]),
        ValueError,
        r"class_labels must be in \[0, 2\], got \[1, 3\]",
    ),
    R("gan-pipe-latents", lambda: gan_pipe()(latents=x(2, 3)), ValueError, r"latents must have shape \(B, 16\)"),
    R("gan-pipe-truncation", lambda: gan_pipe()(truncation=0.0), ValueError, r"truncation must be > 0, got 0.0"),
    R("gan-pipe-batch-float", lambda: gan_pipe()(batch_size=2.0), ValueError, r"batch_size must be an int >= 1"),
    # --- training scripts: arguments --------------------------------------------------------------------------------
    R(
        "train_diffusion-resolution",
        lambda: train_diffusion.parse_args(["--output_dir", "o", "--resolution", "0"]),
        ValueError,
        r"--resolution must be >= 1, got 0",
    ),
    R(
        "train_diffusion-model-config",
        lambda: train_diffusion.parse_args(["--output_dir", "o", "--model_config", "unet-huge"]),
        ValueError,
        r"--model_config 'unet-huge' is neither a JSON file nor a unet preset",
    ),
    R(
        "train_autoencoder-resolution",
        lambda: train_autoencoder.parse_args(["--preset", "ae-tiny", "--resolution", "6"]),
        ValueError,
        r"--resolution \(6\) must be divisible by .* 4",
    ),
    R("train_gan-r1", lambda: train_gan.parse_args(["--r1_gamma", "-1"]), ValueError, r"--r1_gamma must be >= 0, got"),
    R(
        "train_clip-patch",
        lambda: train_clip.parse_args(["--resolution", "10", "--patch_size", "4"]),
        ValueError,
        r"--resolution \(10\) must be divisible by --patch_size \(4\)",
    ),
    # --- training scripts: data and checkpoints ---------------------------------------------------------------------
    *_data_rows(),
]


@pytest.mark.parametrize(("call", "exc", "match"), ROWS)
def test_bad_input_gets_a_clear_error(call, exc, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a row writes lands in the checkout
    takes_tmp = call.__code__.co_varnames[: call.__code__.co_argcount][:1] == ("tmp",)
    with pytest.raises(exc, match=match) as info:
        call(tmp_path) if takes_tmp else call()
    assert type(info.value) in (ValueError, TypeError), f"{type(info.value).__name__}: {info.value}"


# ----------------------------------------------------------------------------------------------------------------------
# 2. Safe loading
# ----------------------------------------------------------------------------------------------------------------------


class CodeCarrier:
    """Unpickling this creates (opens for writing) the file ``marker``: a stand-in for arbitrary code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


MODELS = {"unet": unet, "dit": dit}
ALL_MODELS = {**MODELS, "rin": rin, "ae": ae, "vae": vae, "gan-g": gan_g, "gan-d": gan_d}


@pytest.mark.parametrize("name", sorted(ALL_MODELS))
def test_weights_are_safetensors_and_a_pickle_with_code_is_refused(name, tmp_path):
    model = ALL_MODELS[name]()
    good = tmp_path / "good"
    model.save_pretrained(good)
    assert sorted(os.listdir(good)) == ["config.json", "diffusion_pytorch_model.safetensors"]

    evil, marker = tmp_path / "evil", tmp_path / "marker"
    evil.mkdir()
    shutil.copy(good / "config.json", evil)
    payload = {k: v for k, v in load_file(good / "diffusion_pytorch_model.safetensors").items()}
    payload[sorted(payload)[0]] = CodeCarrier(str(marker))
    torch.save(payload, evil / "diffusion_pytorch_model.bin")
    pickle.loads(pickle.dumps(CodeCarrier(str(marker))))  # the payload is live: unsafe unpickling runs it
    assert marker.exists()
    marker.unlink()

    with pytest.raises(ValueError, match=r"refusing to load .*evil/diffusion_pytorch_model\.bin"):
        type(model).from_pretrained(evil)
    assert not marker.exists()
    if name not in MODELS:
        return
    # the same through a pipeline folder (diffusers' and hfgen's loaders both end in the model's from_pretrained)
    folder = tmp_path / "pipe"
    HFGenPipeline(denoiser=model, scheduler=DDIMScheduler(num_train_timesteps=T)).save_pretrained(folder)
    os.remove(folder / "denoiser" / "diffusion_pytorch_model.safetensors")
    shutil.copy(evil / "diffusion_pytorch_model.bin", folder / "denoiser")
    with pytest.raises(ValueError, match=r"refusing to load .*denoiser/diffusion_pytorch_model\.bin"):
        HFGenPipeline.from_pretrained(folder)
    assert not marker.exists()


@pytest.mark.parametrize("case", ["missing", "truncated", "config"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_broken_weights_name_the_file(name, case, tmp_path):
    model = MODELS[name]()
    model.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    if case == "missing":
        weights.unlink()
        exc = FileNotFoundError
    elif case == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
        exc = OSError
    else:
        config = json.loads((tmp_path / "config.json").read_text())
        key = "block_out_channels" if name == "unet" else "hidden_size"
        config[key] = [32, 64] if name == "unet" else 64
        (tmp_path / "config.json").write_text(json.dumps(config))
        exc = ValueError
    with pytest.raises(exc, match=re.escape(str(weights))):
        type(model).from_pretrained(tmp_path)


def test_config_with_extra_tensors_is_not_silently_initialised(tmp_path):
    unet().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_classes": 3}))
    with pytest.raises(ValueError, match=r"does not match .*config\.json: tensors missing from the file: \['class_"):
        UNetModel.from_pretrained(tmp_path)


def test_hub_code_runs_only_with_trust_remote_code(tmp_path):
    # an offline Hub cache holding "evil/repo": a real hfgen pipeline whose .py files write a marker when imported
    cache, marker, revision = tmp_path / "hub", tmp_path / "marker", "0" * 40
    repo = cache / "models--evil--repo"
    snapshot = repo / "snapshots" / revision
    HFGenPipeline(denoiser=unet(), scheduler=DDIMScheduler(num_train_timesteps=T)).save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    evil = f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    code_files = [snapshot / "pipeline.py", snapshot / "denoiser" / "hfgen.unet.py"]
    for path in code_files:
        path.write_text(path.read_text() + evil)

    loaded = HFGenPipeline.from_pretrained("evil/repo", cache_dir=cache)
    assert isinstance(loaded.denoiser, UNetModel) and not marker.exists()
    for source in ("evil/repo", snapshot):
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            DiffusionPipeline.from_pretrained(source, cache_dir=cache)
        assert not marker.exists()
    # the payload is live: with trust_remote_code=True diffusers imports pipeline.py
    DiffusionPipeline.from_pretrained(snapshot, trust_remote_code=True)
    assert marker.exists()


def test_training_checkpoints_hold_safetensors_and_safe_pickles(tmp_path):
    out = tmp_path / "out"
    train("diffusion", tmp_path, "--shapes_num_images", "4", "--checkpointing_steps", "1")
    checkpoint = out / "checkpoint-1"
    assert (checkpoint / "model.safetensors").is_file()
    assert load_file(checkpoint / "model.safetensors")  # real tensors
    assert (out / "denoiser" / "diffusion_pytorch_model.safetensors").is_file()
    pickles = [p for p in checkpoint.iterdir() if p.suffix in (".bin", ".pkl", ".pt")]
    assert not [p for p in checkpoint.iterdir() if p.name.startswith("pytorch_model")]
    for path in pickles:  # optimizer / scheduler / RNG states: accelerate reads them with weights_only=True
        accelerate_load(path, map_location="cpu")


def test_ema_state_round_trips_as_safetensors(tmp_path):
    model = torch.nn.Linear(3, 2)
    ema = EMAModel(model.parameters(), decay=0.9, use_ema_warmup=True, power=0.5)
    for _ in range(3):
        model.weight.data += 1
        ema.step(model.parameters())
    path = save_ema_state(ema, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["ema_state.safetensors"] and path.endswith(".safetensors")
    restored = EMAModel(torch.nn.Linear(3, 2).parameters(), decay=0.5)
    load_ema_state(restored, tmp_path)
    assert restored.optimization_step == 3 and restored.decay == 0.9 and restored.power == 0.5
    for a, b in zip(restored.shadow_params, ema.shadow_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_ema_is_not_a_pickle_read_unsafely(tmp_path):
    # accelerate's load_custom_state reads custom_checkpoint_<i>.pkl (register_for_checkpointing) with
    # weights_only=False; the EMA weights must travel as safetensors instead
    train("diffusion", tmp_path, "--shapes_num_images", "4", "--checkpointing_steps", "1", "--use_ema")
    checkpoint = tmp_path / "out" / "checkpoint-1"
    assert not sorted(checkpoint.glob("custom_checkpoint_*.pkl")), sorted(os.listdir(checkpoint))
    assert list(checkpoint.rglob("*.safetensors"))


# ----------------------------------------------------------------------------------------------------------------------
# 3. Reproducibility
# ----------------------------------------------------------------------------------------------------------------------


def _images(p, seeds, **kwargs) -> np.ndarray:
    out = p(**{"generator": [torch.Generator().manual_seed(s) for s in seeds], "output_type": "np", **kwargs})
    return np.asarray(out.images)


SAMPLERS = {
    "hfgen": (pipe, {"num_inference_steps": 3}),  # DDPM: fresh noise at every step, from the generators too
    "hfgen-class": (pipe_cls, {"num_inference_steps": 2, "class_labels": 1}),
    "vae-prior": (vae_pipe, {}),
    "gan": (gan_pipe, {}),
    "gan-class-drawn-labels": (gan_pipe_cls, {}),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_image_i_depends_only_on_generator_i(name):
    build, kwargs = SAMPLERS[name]
    p = build()
    batch = _images(p, [3, 4, 5], batch_size=3, **kwargs)
    again = _images(p, [3, 4, 5], batch_size=3, **kwargs)
    np.testing.assert_array_equal(batch, again)  # same seeds, same batch, same kernels: same images
    # batch 1 and batch 3 run the networks' convs and matmuls with other blockings (other kernels on another CPU):
    # 512 float32 eps of the images' magnitude (1) per network pass, as in test_pipeline (image mixing moves ~0.1)
    num_eps = 512 * kwargs.get("num_inference_steps", 1)
    for i, seed in enumerate([3, 4, 5]):
        alone = _images(p, [seed], batch_size=1, **kwargs)
        assert_close_float32(alone[0], batch[i], num_eps, floor=1.0, msg=f"image {i} alone")
    other = _images(p, [4, 9, 5], batch_size=3, **kwargs)
    assert_close_float32(other[[0, 2]], batch[[1, 2]], num_eps, floor=1.0, msg="neighbours do not matter")


def test_noise_is_drawn_on_the_cpu():
    p = pipe_cls()  # DDIM, eta = 0: the starting noise is the only draw
    shape = (2, 3, 8, 8)
    drawn = p(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=2, output_type="latent")
    given = p(latents=torch.randn(shape, generator=torch.Generator().manual_seed(0)), batch_size=2,
              num_inference_steps=2, output_type="latent")  # fmt: skip
    torch.testing.assert_close(drawn.images, given.images, rtol=0, atol=0)
    torch.manual_seed(1)  # no generator: torch's global CPU generator, whatever the execution device
    unseeded = p(batch_size=2, num_inference_steps=2, output_type="latent").images
    torch.manual_seed(1)
    expected = p(latents=torch.randn(shape), batch_size=2, num_inference_steps=2, output_type="latent").images
    torch.testing.assert_close(unseeded, expected, rtol=0, atol=0)
