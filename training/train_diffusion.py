"""Train a diffusion denoiser (U-Net, DiT or RIN) with Accelerate and save an hfgen pipeline folder.

    accelerate launch training/train_diffusion.py --model unet --output_dir out          # shapes, unconditional
    accelerate launch training/train_diffusion.py --model dit --conditioning class --output_dir out
    python -m hfgen.training.train_diffusion --model rin --mnist_npz ../shared/data/mnist10k.npz --output_dir out
    accelerate launch training/train_diffusion.py --model dit --objective flow_matching --output_dir out

Objectives: ``diffusion`` (DDPM noising; ``--prediction_type`` epsilon / v_prediction / sample, optional min-SNR
weights; samples with hfgen's DDIMScheduler) or ``flow_matching`` (rectified flow x_t = (1 - sigma) x_0 + sigma eps,
target u = eps - x_0, sigma from diffusers' SD3 timestep density, the denoiser fed t = sigma * T; samples with
diffusers' FlowMatchEulerDiscreteScheduler). The formulas are ``hfgen.objectives``; condition dropout is
``hfgen.guidance``.

Data: the built-in shapes set by default, or ``--dataset_name`` (Hub), ``--train_data_dir`` (imagefolder) or
``--mnist_npz`` (first 8000 digits). Conditioning: none, class labels (label dropout to the null label for CFG) or
text from a frozen CLIP text encoder (caption dropout to ""). With ``--vae`` the denoiser learns VAE latents,
encoded once before training.

Reproducibility: every random draw of a step (timesteps, noise, dropout masks, flips, self-conditioning) comes from a
generator seeded by (seed, step, micro-batch) and drawn for the global batch, each process taking its slice, and the
data order is a seeded permutation per epoch. So a run resumed from a checkpoint, or split over several processes,
follows the same trajectory as one uninterrupted single-process run.

Speed: ``--compile`` (torch.compile with inductor, after ``accelerator.prepare``: the same wrapping as ``accelerate
launch --dynamo_backend inductor``, and never both), ``--channels_last`` (the U-Net), ``--allow_tf32`` (CUDA).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
from collections import OrderedDict

import torch
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, is_compiled_module
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import EMAModel

import hfgen
from hfgen import objectives
from hfgen.clip import tokenize
from hfgen.data import image_transform
from hfgen.guidance import drop_captions, drop_class_labels
from hfgen.pipelines.hub import image_grid
from hfgen.schedulers import BETA_SCHEDULES, PREDICTION_TYPES, DDIMScheduler, DDPMScheduler
from hfgen.training_utils import (
    GlobalBatchDraws,
    Lamb,
    NonFiniteGuard,
    TrainingLength,
    TransformedImages,
    UpdateLoop,
    add_run_args,
    all_finite,
    attach_ema,
    checkpoint_if_due,
    checkpoint_weights,
    count_classes,
    fused_adam,
    guarded_update,
    hub_training_info,
    image_cache_fits,
    lamb_param_groups,
    load_checkpoint,
    load_train_dataset,
    log_image_grid,
    make_accelerator,
    resolve_resume,
    start_trackers,
)

logger = get_logger(__name__)

# ----------------------------------------------------------------------------------------------------------------------
# Helpers: models
# ----------------------------------------------------------------------------------------------------------------------

MODELS = ("unet", "dit", "rin")
DEFAULT_PRESETS = {"unet": "unet-mnist", "dit": "DiT-mini/4", "rin": "RIN-small"}  # train on a CPU in minutes
# the measured small-data recipe per family (benchmarks/RESULTS.md, RESULTS_class_conditional.md): the defaults of
# --learning_rate and --train_batch_size; AdamW beta2 0.99 for all (few steps: a short second-moment memory)
SMALL_DATA_RECIPES = {
    # unconditional MNIST, 8 equal minutes: FID 28.7 at 5e-4, 33.1 at 1e-3, 36.5 at 2e-3 (RESULTS.md, stop 22)
    "unet": {"learning_rate": 5e-4, "train_batch_size": 32},
    "dit": {"learning_rate": 1e-3, "train_batch_size": 64},
    "rin": {"learning_rate": 3e-3, "train_batch_size": 32},  # the asked digit in 1.5x the DiT's time; 1e-3 took 6.6x
}
# the U-Net rate the conditional figures were measured at (the demo, bench_class_conditional.py, compare_denoisers.py)
CONDITIONAL_UNET_LEARNING_RATE = 2e-3


def model_family(name: str) -> tuple[type, dict[str, dict]]:
    """The denoiser class and its presets for ``--model``."""
    if name == "unet":
        return hfgen.UNetModel, hfgen.UNET_PRESETS
    if name == "dit":
        return hfgen.DiTModel, hfgen.DIT_PRESETS
    return hfgen.RINModel, hfgen.RIN_PRESETS


def load_model_config(model: str, model_config: str | None) -> dict:
    """Constructor kwargs from a preset name or a JSON file (a ``config.json`` saved by ``save_pretrained`` works)."""
    cls, presets = model_family(model)
    name = model_config or DEFAULT_PRESETS[model]
    if name in presets:
        return dict(presets[name])
    if name.endswith(".json") or os.path.isfile(name):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"--model_config file not found: {name}")
        with open(name, encoding="utf-8") as f:
            config = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(config) - accepted)
        if unknown:
            raise ValueError(f"--model_config {name} has keys {unknown} that {cls.__name__} does not take")
        return config
    raise ValueError(f"--model_config {name!r} is neither a JSON file nor a {model} preset; presets: {sorted(presets)}")


def build_model(args, in_channels: int, sample_size: int, num_classes: int | None, text_dim: int | None):
    cls, _ = model_family(args.model)
    config = load_model_config(args.model, args.model_config)
    if config.get("learn_sigma"):
        raise ValueError(
            "--model_config sets learn_sigma=true; this script trains the simple MSE loss only, "
            "which leaves a learned variance untrained: set learn_sigma to false"
        )
    config.update(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        num_classes=num_classes,
        cross_attention_dim=text_dim,
    )
    try:
        model = cls(**config)
    except ValueError as error:
        raise ValueError(
            f"--model {args.model} --model_config {args.model_config or DEFAULT_PRESETS[args.model]} "
            f"cannot be built at --resolution {args.resolution} (sample size {sample_size}): {error}"
        ) from error
    f = model.downsample_factor
    if sample_size % f:
        raise ValueError(
            f"--resolution {args.resolution} gives sample size {sample_size}, which must be divisible by "
            f"the model's downsample factor {f}"
        )
    return model


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's


def compile_model(accelerator, model, mode: str | None):
    """``torch.compile`` the prepared model (inductor) as Accelerate's dynamo config does at the end of ``prepare``:
    the compiled module wraps the DDP one, so the forward still goes through it. A model that the launcher's config
    (``accelerate launch --dynamo_backend ...``) already compiled is returned as it is, with a warning."""
    if is_compiled_module(model):
        plugin = accelerator.state.dynamo_plugin
        logger.warning(
            f"--compile: Accelerate's dynamo config already compiled the model (backend {plugin.backend.value.lower()}, "
            f"mode {plugin.mode}); not compiling it a second time, so --compile_mode is not applied"
        )
        return model
    return torch.compile(model, backend="inductor", mode=mode)


def load_clip_text_model(folder: str):
    """The ``CLIPTextModel`` saved in ``folder``. A ``CLIPTextModelWithProjection`` there (``train_clip.py``'s
    text_encoder/) is read as itself and its text tower kept: the projection, which conditioning does not use, is
    dropped without transformers' load report of "unexpected" keys, and a pipeline saves the same CLIPTextModel."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if "CLIPTextModelWithProjection" not in (CLIPTextConfig.from_pretrained(folder).architectures or []):
        return CLIPTextModel.from_pretrained(folder)
    encoder = CLIPTextModelWithProjection.from_pretrained(folder).text_model
    if not isinstance(encoder, CLIPTextModel):  # a transformers whose text tower is not a CLIPTextModel: load noisily
        return CLIPTextModel.from_pretrained(folder)
    return encoder


def load_text_encoder(path: str):
    """A frozen ``CLIPTextModel`` and its ``CLIPTokenizer`` from ``path`` (subfolders text_encoder/tokenizer, or flat)."""
    from transformers import CLIPTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--text_encoder {path!r} is not a folder")
    nested = os.path.isdir(os.path.join(path, "text_encoder"))
    encoder = load_clip_text_model(os.path.join(path, "text_encoder") if nested else path)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer") if nested else path)
    encoder.requires_grad_(False).eval()
    return encoder, tokenizer


def encode_prompts(text_encoder, tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> (text tokens (B, L, D), attention mask (B, L)), padded to max length exactly as
    ``HFGenTextToImagePipeline`` does, so "" here is the pipeline's unconditional input."""
    max_length = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)
    batch = tokenize(tokenizer, prompts, max_length)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    with torch.no_grad():
        return text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask  # (B, L, D), (B, L)


class PromptEmbeddingCache:
    """The frozen text encoder's output for each caption, computed once and reused: a caption set that repeats
    (the shapes data, a captioned folder) is encoded once per distinct caption instead of every micro-batch.

    Captions are padded to the same max length as ``encode_prompts`` and the encoder is frozen, so a caption's rows
    do not depend on the batch it came in (up to float rounding of the batch size). At most ``max_entries`` captions
    are kept (least recently used dropped); 0 turns the cache off.
    """

    def __init__(self, text_encoder, tokenizer, device, max_entries: int):
        self.text_encoder, self.tokenizer, self.device, self.max_entries = text_encoder, tokenizer, device, max_entries
        self.rows: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.max_entries == 0:
            return encode_prompts(self.text_encoder, self.tokenizer, prompts, self.device)
        distinct = list(dict.fromkeys(prompts))
        missing = [p for p in distinct if p not in self.rows]
        if missing:
            tokens, mask = encode_prompts(self.text_encoder, self.tokenizer, missing, self.device)
            self.rows.update((p, (t.clone(), m.clone())) for p, t, m in zip(missing, tokens, mask))
        for p in distinct:
            self.rows.move_to_end(p)
        tokens = torch.stack([self.rows[p][0] for p in prompts])
        mask = torch.stack([self.rows[p][1] for p in prompts])
        while len(self.rows) > self.max_entries:  # after the batch is read, so a batch larger than the cache works
            self.rows.popitem(last=False)
        return tokens, mask


def load_vae(path: str):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--vae {path!r} is not a folder")
    subfolder = "vae" if os.path.isdir(os.path.join(path, "vae")) else None
    config_path = os.path.join(path, subfolder or "", "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"--vae {path!r} has no config.json (looked for {config_path})")
    with open(config_path) as f:
        class_name = json.load(f).get("_class_name")
    classes = {"VAEModel": hfgen.VAEModel, "AutoencoderModel": hfgen.AutoencoderModel}
    if class_name not in classes:
        raise ValueError(f"--vae {path!r} holds a {class_name!r}; accepted: {sorted(classes)}")
    vae = classes[class_name].from_pretrained(path, subfolder=subfolder)
    return vae.requires_grad_(False).eval()


# ----------------------------------------------------------------------------------------------------------------------
# Helpers: data
# ----------------------------------------------------------------------------------------------------------------------


def load_training_data(args):
    """The training set as a ``datasets.Dataset`` with ``image`` and, as the conditioning needs, ``label``/``text``."""
    caption = args.caption_column if args.conditioning == "text" else None
    label = args.label_column if args.conditioning == "class" else None
    exclude = [tuple(pair.partition(" ")[::2]) for pair in args.shapes_exclude] if args.shapes_exclude else None
    return load_train_dataset(args, args.shapes_num_images, caption, label, exclude)


class EpochSampler(torch.utils.data.Sampler):
    """A permutation of range(n) seeded by (seed, epoch): the data order of an epoch is known without any history."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class TrainExamples(torch.utils.data.Dataset):
    """Index -> {"x": image (C, H, W) in [-1, 1] or cached latent moments, "label": int, "text": str}; labels and
    captions are read once, so with cached latents no image is decoded during training. With ``cache_images`` (a
    deterministic transform) each image is decoded and transformed once and kept, instead of once per epoch."""

    def __init__(self, dataset, transform, latents: torch.Tensor | None = None, cache_images: bool = False):
        self.dataset, self.latents = dataset, latents
        self.labels = list(dataset["label"]) if "label" in dataset.column_names else None
        self.texts = list(dataset["text"]) if "text" in dataset.column_names else None
        self.image = TransformedImages(dataset, transform, keep=cache_images and latents is None)  # i -> (C, H, W)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = {"x": self.image(i) if self.latents is None else self.latents[i]}
        if self.labels is not None:
            item["label"] = int(self.labels[i])
        if self.texts is not None:
            item["text"] = self.texts[i] or ""
        return item


def may_cache_images(args, dataset, channels: int) -> bool:
    """Whether ``TrainExamples`` may keep every transformed image: the transform is deterministic (padding, a centre
    crop, or the square built-in shapes / MNIST, where the random crop has nothing to choose) and the images fit
    (``image_cache_fits``)."""
    deterministic = args.pad_images or args.center_crop or not (args.dataset_name or args.train_data_dir)
    fits = image_cache_fits(len(dataset), channels * args.resolution**2, args.dataloader_num_workers)
    return bool(deterministic) and fits


def collate(items: list[dict]) -> dict:
    batch = {"x": torch.stack([it["x"] for it in items])}
    if "label" in items[0]:
        batch["label"] = torch.tensor([it["label"] for it in items])
    if "text" in items[0]:
        batch["text"] = [it["text"] for it in items]
    return batch


@torch.no_grad()
def encode_latents(vae, dataset, transform, random_flip: bool, device, batch_size: int = 64) -> torch.Tensor:
    """Encode every image once: (N, 2, C, h, w) = [mean | std] of the posterior, or (N, 2 orientations, 2, C, h, w)
    with ``random_flip``; a training step samples mean + std * noise from its step generator."""
    vae = vae.to(device)
    out = []
    for start in range(0, len(dataset), batch_size):
        images = torch.stack([transform(im) for im in dataset[start : start + batch_size]["image"]]).to(device)
        views = [images, images.flip(-1)] if random_flip else [images]
        moments = []
        for view in views:
            dist = vae.encode(view).latent_dist
            moments.append(torch.stack([dist.mean, dist.std], dim=1))  # (b, 2, C, h, w)
        out.append((torch.stack(moments, dim=1) if random_flip else moments[0]).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------------
# Helpers: objective
# ----------------------------------------------------------------------------------------------------------------------


OBJECTIVES = ("diffusion", "flow_matching")


def draw_noise_levels(args, draws: GlobalBatchDraws) -> torch.Tensor:
    """The noise level of each example: an int timestep t (B,) for diffusion, sigma in [0, 1] (B,) for flow matching."""
    if args.objective == "flow_matching":
        return draws.timestep_density(args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale)
    return draws.randint(args.num_train_timesteps)


def forward_process(args, noise_scheduler, x0: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor):
    """x_t (B, C, H, W), the denoiser's timestep input (B,), the target (B, C, H, W) and the loss weights (B,) or None,
    for the noise ``levels`` of ``draw_noise_levels``."""
    if args.objective == "flow_matching":
        alpha, sigma = objectives.flow_coefficients(levels, x0.ndim)
        timesteps = objectives.flow_timesteps(levels, args.num_train_timesteps)
        weights = objectives.flow_matching_weight(levels, args.weighting_scheme)
        prediction_type = "flow_prediction"
    else:
        alpha, sigma = noise_scheduler.noise_coefficients(levels, x0)
        timesteps, prediction_type = levels, args.prediction_type
        weights = None
        if args.snr_gamma is not None:
            snr = objectives.snr(alpha, sigma).reshape(-1)
            weights = objectives.min_snr_weight(snr, args.snr_gamma, prediction_type)
    noisy = objectives.noisy_sample(x0, noise, alpha, sigma)
    return noisy, timesteps, objectives.training_target(x0, noise, alpha, sigma, prediction_type), weights


def self_conditioning_latents(model, noisy, timesteps, cond: dict, self_cond_global, rows: slice):
    """RIN's previous latents for the real pass: the no-grad first pass's latents for the examples that
    self-condition (``self_cond_global[rows]``), zeros for the others; None when no example of the global batch does.

    The first pass runs on the self-conditioning examples only (half the batch at probability 0.5, not all of it).
    Whether it runs at all is decided on the global batch, so every rank calls the model alike (a sharded model
    gathers its weights in every forward); a rank none of whose examples self-conditions runs it on its whole batch
    and keeps nothing.
    """
    if not self_cond_global.any():
        return None
    chosen = self_cond_global[rows]  # (b,) this process's examples
    index = chosen.nonzero().squeeze(1) if chosen.any() else torch.arange(len(chosen), device=chosen.device)
    sub_cond = {k: None if v is None else v[index] for k, v in cond.items()}
    with torch.no_grad():
        latents = model(noisy[index], timesteps[index], prev_latents=None, **sub_cond).latents  # (n, M, D)
    prev = torch.zeros(len(chosen), *latents.shape[1:], device=latents.device, dtype=latents.dtype)
    if chosen.any():
        prev[index] = latents
    return prev


def objective_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The mean over the batch of the per-example MSE (B,), times the loss weights when there are any."""
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    return (loss if weights is None else loss * weights).mean()


def sampling_scheduler(args, noise_scheduler):
    """The scheduler of the saved pipeline and the validation samples: hfgen's DDIM with the training schedule, or
    diffusers' flow-matching Euler scheduler (shift 1: the sigmas the training density covers)."""
    if args.objective == "flow_matching":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=args.num_train_timesteps, shift=1.0)
    return DDIMScheduler.from_config(noise_scheduler.config)


# ----------------------------------------------------------------------------------------------------------------------
# Helpers: pipelines, images
# ----------------------------------------------------------------------------------------------------------------------


def build_pipeline(args, denoiser, sample_scheduler, vae, text_encoder, tokenizer):
    if args.conditioning == "text":
        from hfgen.pipelines import HFGenTextToImagePipeline

        return HFGenTextToImagePipeline(
            denoiser=denoiser, scheduler=sample_scheduler, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae
        )
    from hfgen.pipelines import HFGenPipeline

    return HFGenPipeline(denoiser=denoiser, scheduler=sample_scheduler, vae=vae)


def sample_images(args, pipeline, num_classes: int | None, device) -> list:
    """``--num_validation_images`` PIL samples: cycling labels (class), the validation prompts (text) or unconditional."""
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    n = args.num_validation_images
    kwargs = {"num_inference_steps": args.num_inference_steps, "generator": generator, "output_type": "pil"}
    if args.conditioning == "class":
        labels = torch.arange(n) % num_classes
        return pipeline(batch_size=n, class_labels=labels, guidance_scale=args.guidance_scale, **kwargs).images
    if args.conditioning == "text":
        prompts = [args.validation_prompts[i % len(args.validation_prompts)] for i in range(n)]
        return pipeline(prompt=prompts, guidance_scale=args.guidance_scale, **kwargs).images
    return pipeline(batch_size=n, **kwargs).images


# ----------------------------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------------------------


def make_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    """``--optimizer``: torch's fused AdamW, or ``Lamb`` over ``lamb_param_groups``; the --adam_* flags for both."""
    betas, eps = (args.adam_beta1, args.adam_beta2), args.adam_epsilon
    if args.optimizer == "lamb":
        return Lamb(lamb_param_groups(model, args.adam_weight_decay), lr=args.learning_rate, betas=betas, eps=eps)
    return fused_adam(
        model.parameters(), lr=args.learning_rate, betas=betas, weight_decay=args.adam_weight_decay, eps=eps
    )


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The denoiser family and preset, its conditioning (classes, text, a VAE's latents) and self-conditioning."""
    g = p.add_argument_group("model and conditioning")
    g.add_argument("--model", choices=MODELS, default="unet", help="denoiser family")
    g.add_argument("--model_config", default=None, help=f"preset name or JSON file; default {DEFAULT_PRESETS}")
    g.add_argument("--conditioning", choices=("none", "class", "text"), default="none")
    g.add_argument("--num_classes", type=int, default=None, help="class count (default: from the label column)")
    g.add_argument(
        "--cond_dropout", type=float, default=0.1, help="label / caption dropout for classifier-free guidance"
    )
    g.add_argument("--text_encoder", default=None, help="folder with a CLIPTextModel and CLIPTokenizer (frozen)")
    g.add_argument("--vae", default=None, help="folder of an hfgen VAEModel or AutoencoderModel: train on its latents")
    g.add_argument(
        "--text_cache_size",
        type=int,
        default=1024,
        help="text conditioning: keep the frozen text encoder's output for this many distinct captions (0: off)",
    )
    g.add_argument("--self_cond_prob", type=float, default=0.9, help="RIN: probability of latent self-conditioning")
    g.add_argument("--gradient_checkpointing", action="store_true")


def add_speed_args(p: argparse.ArgumentParser) -> None:
    """torch.compile, the channels-last memory format and TF32 (the module docstring's "Speed")."""
    g = p.add_argument_group("speed")
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the denoiser with inductor after accelerator.prepare, as `accelerate launch "
        "--dynamo_backend inductor` (or a dynamo section of `accelerate config`) does; give one or the other: when the "
        "launcher already compiled the model, this flag only warns. The first steps pay the compile time (tens of "
        "seconds on a CPU); samples and saved weights use the plain module",
    )
    g.add_argument(
        "--compile_mode", choices=COMPILE_MODES, default=None, help="with --compile: torch.compile's mode (default)"
    )
    g.add_argument(
        "--channels_last",
        action="store_true",
        help="U-Net only: weights and inputs in torch.channels_last memory format (oneDNN's and cuDNN's faster "
        "convolution layout); refused for DiT and RIN, which compute on token tensors (B, N, D)",
    )
    g.add_argument(
        "--allow_tf32",
        action="store_true",
        help="CUDA: TF32 for float32 matmuls and convolutions (torch.backends.cuda.matmul / cudnn.allow_tf32); "
        "no effect on a CPU",
    )


def add_objective_args(p: argparse.ArgumentParser) -> None:
    """The DDPM noise schedule and the objective: diffusion's prediction type and min-SNR weights, flow matching's
    sigma density."""
    g = p.add_argument_group("noise schedule and objective")
    g.add_argument("--num_train_timesteps", type=int, default=1000)
    g.add_argument("--beta_schedule", choices=BETA_SCHEDULES, default="linear")
    g.add_argument("--beta_start", type=float, default=1e-4)
    g.add_argument("--beta_end", type=float, default=0.02)
    g.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="flow_matching",
        help="what the denoiser learns; flow_matching by default (the better FID/asked-digit share, benchmarks/)",
    )
    g.add_argument("--prediction_type", choices=PREDICTION_TYPES, default=None, help="diffusion: default epsilon")
    g.add_argument(
        "--snr_gamma", type=float, default=None, help="diffusion: min-SNR loss weighting gamma (e.g. 5.0); off if unset"
    )
    g.add_argument(
        "--weighting_scheme",
        choices=objectives.FLOW_WEIGHTING_SCHEMES,
        default="logit_normal",
        help="flow matching: the sigma density and loss weight, as in diffusers' SD3 script",
    )
    g.add_argument("--logit_mean", type=float, default=0.0, help="flow matching, logit_normal: mean of logit(sigma)")
    g.add_argument("--logit_std", type=float, default=1.0, help="flow matching, logit_normal: std of logit(sigma)")
    g.add_argument("--mode_scale", type=float, default=1.29, help="flow matching, mode: the density's scale")


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The training images, captions and labels: this script's own flags rather than ``add_image_data_args``'s (a
    caption and a label column by default, ``--shapes_exclude``, ``--pad_images``)."""
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None, help="Hub data set (default: the built-in shapes)")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_data_dir", default=None, help="local imagefolder (optional metadata.jsonl)")
    g.add_argument("--mnist_npz", default=None, help="MNIST npz (first 8000 digits are used)")
    g.add_argument("--cache_dir", default=None)
    g.add_argument("--image_column", default="image")
    g.add_argument("--caption_column", default="text")
    g.add_argument("--label_column", default="label")
    g.add_argument(
        "--shapes_num_images",
        "--num_shapes",
        dest="shapes_num_images",
        type=int,
        default=4096,
        help="size of the built-in shapes training set (also --num_shapes, the other scripts' name)",
    )
    g.add_argument("--shapes_exclude", nargs="*", default=None, help='shapes pairs left out, e.g. "red triangle"')
    g.add_argument("--resolution", type=int, default=32)
    g.add_argument("--channels", type=int, choices=(1, 3), default=None, help="default: 1 for MNIST, else 3")
    g.add_argument("--center_crop", action="store_true")
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--pad_images", action="store_true", help="pad smaller images to --resolution instead of resizing")
    g.add_argument("--dataloader_num_workers", type=int, default=0)


def add_optimization_args(p: argparse.ArgumentParser) -> None:
    """Batch size, training length, the learning rate and its schedule, the optimiser, clipping and EMA."""
    g = p.add_argument_group("optimisation and EMA")
    g.add_argument(
        "--train_batch_size", type=int, default=None, help="per process (default: the family's, SMALL_DATA_RECIPES)"
    )
    g.add_argument("--num_epochs", type=int, default=10)
    g.add_argument("--max_train_steps", type=int, default=None, help="overrides --num_epochs")
    g.add_argument("--learning_rate", type=float, default=None, help="default: the family's, SMALL_DATA_RECIPES")
    g.add_argument("--lr_scheduler", default="cosine", help="a diffusers.optimization schedule name")
    g.add_argument("--lr_warmup_steps", type=int, default=100)
    g.add_argument(
        "--optimizer",
        choices=("adamw", "lamb"),
        default="adamw",
        help="adamw: torch's fused AdamW; lamb: LAMB as RIN was trained (trust ratio per weight matrix, biases and norm "
        "scales plain Adam without decay); both read the --adam_* flags",
    )
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.99)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--use_ema", action="store_true")
    g.add_argument("--ema_max_decay", type=float, default=0.9999)
    g.add_argument("--ema_inv_gamma", type=float, default=1.0)
    g.add_argument("--ema_power", type=float, default=0.75)


def add_validation_args(p: argparse.ArgumentParser) -> None:
    """The sample grids logged during training, and the Hub token."""
    g = p.add_argument_group("validation samples, the Hub token")
    g.add_argument("--validation_steps", type=int, default=None, help="log a sample grid every N steps")
    g.add_argument("--validation_prompts", nargs="*", default=None, help="text conditioning: prompts to sample")
    g.add_argument("--num_validation_images", type=int, default=16)
    g.add_argument("--num_inference_steps", type=int, default=50, help="sampler steps for samples")
    g.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="CFG scale for conditional samples; default: the pipeline's (class and text 3.0, hfgen.guidance)",
    )
    g.add_argument("--hub_token", default=None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(p)
    add_speed_args(p)
    add_objective_args(p)
    add_data_args(p)
    add_optimization_args(p)
    add_validation_args(p)
    add_run_args(p, output_dir=None)
    args = p.parse_args(argv)
    for name, value in SMALL_DATA_RECIPES.get(args.model, {}).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_args(args)
    return args


def given_data_sources(args: argparse.Namespace) -> list[str]:
    """The data-source flags given (none: the built-in shapes)."""
    return [n for n in ("dataset_name", "train_data_dir", "mnist_npz") if getattr(args, n)]


def check_data_source(args: argparse.Namespace) -> None:
    """At most one of --dataset_name, --train_data_dir and --mnist_npz."""
    sources = given_data_sources(args)
    if len(sources) > 1:
        raise ValueError(f"give at most one data source, got {['--' + s for s in sources]}")


def check_ranges(args: argparse.Namespace) -> None:
    """The counts, probabilities and rates that have a valid range of their own."""
    positive = (
        "resolution",
        "train_batch_size",
        "num_epochs",
        "gradient_accumulation_steps",
        "checkpointing_steps",
        "num_train_timesteps",
        "num_inference_steps",
        "num_validation_images",
        "shapes_num_images",
    )
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.text_cache_size < 0:
        raise ValueError(f"--text_cache_size must be >= 0 (0 turns the cache off), got {args.text_cache_size}")
    for name in ("max_train_steps", "validation_steps", "checkpoints_total_limit", "num_classes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("cond_dropout", "self_cond_prob"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ValueError(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    if not 0.0 < args.ema_max_decay < 1.0:
        raise ValueError(f"--ema_max_decay must be in (0, 1), got {args.ema_max_decay}")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}")
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        raise ValueError(f"--snr_gamma must be > 0, got {args.snr_gamma}")


def check_objective(args: argparse.Namespace) -> None:
    """Reject diffusion-only flags with flow matching; default diffusion's --prediction_type to epsilon."""
    if args.objective == "flow_matching":
        for name in ("prediction_type", "snr_gamma"):
            if getattr(args, name) is not None:
                raise ValueError(
                    f"--{name} applies to --objective diffusion; flow matching predicts the velocity eps - x0 and "
                    "weights its loss by --weighting_scheme"
                )
        if args.logit_std <= 0:
            raise ValueError(f"--logit_std must be > 0, got {args.logit_std}")
    if args.objective == "diffusion":
        args.prediction_type = args.prediction_type or "epsilon"


def check_conditioning(args: argparse.Namespace) -> None:
    """The guidance scale and the flags of one --conditioning; default text conditioning's --validation_prompts."""
    if args.guidance_scale is not None and args.guidance_scale < 1:
        raise ValueError(f"--guidance_scale must be >= 1, got {args.guidance_scale}")
    if args.conditioning == "text" and not args.text_encoder:
        raise ValueError("--conditioning text needs --text_encoder (a folder with a CLIPTextModel and CLIPTokenizer)")
    if args.text_encoder and args.conditioning != "text":
        raise ValueError(
            f"--text_encoder is only used with --conditioning text, got --conditioning {args.conditioning}"
        )
    if args.validation_prompts and args.conditioning != "text":
        raise ValueError("--validation_prompts need --conditioning text")
    if args.conditioning == "text" and not args.validation_prompts:
        args.validation_prompts = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
    if args.num_classes is not None and args.conditioning != "class":
        raise ValueError(
            f"--num_classes is only used with --conditioning class, got --conditioning {args.conditioning}"
        )


def check_shapes_exclude(args: argparse.Namespace) -> None:
    """--shapes_exclude: only for the built-in shapes, and only "color shape" pairs of them."""
    if args.shapes_exclude and given_data_sources(args):
        raise ValueError("--shapes_exclude only applies to the built-in shapes data")
    for pair in args.shapes_exclude or ():
        color, _, shape = pair.partition(" ")
        try:
            hfgen.data.shapes_label(color, shape)
        except ValueError as error:
            raise ValueError(f'--shapes_exclude {pair!r} is not a "color shape" pair: {error}') from None


def check_run_args(args: argparse.Namespace) -> None:
    """The resume checkpoint, the speed flags and the Hub upload."""
    if args.resume_from_checkpoint not in (None, "latest"):
        resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if args.compile_mode is not None and not args.compile:
        raise ValueError(f"--compile_mode {args.compile_mode} needs --compile")
    if args.channels_last and args.model != "unet":
        raise ValueError(
            f"--channels_last applies to the convolutional U-Net (--model unet), got --model {args.model}, "
            "which computes on token tensors (B, N, D): they have no channels-last format"
        )
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id")


def check_args(args: argparse.Namespace) -> None:
    """Reject bad combinations before any work, naming the argument (and fill the defaults that depend on others:
    diffusion's --prediction_type, text conditioning's --validation_prompts)."""
    check_data_source(args)
    check_ranges(args)
    check_objective(args)
    check_conditioning(args)
    check_shapes_exclude(args)
    check_run_args(args)
    model_family(args.model)
    load_model_config(args.model, args.model_config)


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------------------
# Set-up: the data with its frozen encoders, the model and its optimiser
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainingInputs:
    """What the denoiser learns from: the examples (images, or cached VAE latent moments), the shape of x0, and the
    frozen parts that the loss and the saved pipeline share (VAE, text encoder, the number of classes)."""

    examples: TrainExamples
    in_channels: int
    sample_size: int
    vae: torch.nn.Module | None = None
    latents: torch.Tensor | None = None
    num_classes: int | None = None
    text_encoder: torch.nn.Module | None = None
    tokenizer: object | None = None
    embed_prompts: PromptEmbeddingCache | None = None

    @property
    def text_dim(self) -> int | None:
        return self.text_encoder.config.hidden_size if self.text_encoder is not None else None


def load_vae_for(args, channels: int):
    """``--vae`` (or None) and the image channels it encodes, checked against ``--channels``."""
    if not args.vae:
        return None, channels
    vae = load_vae(args.vae)
    if args.channels is not None and args.channels != vae.config.in_channels:
        raise ValueError(f"--channels {args.channels} does not match the VAE's in_channels {vae.config.in_channels}")
    return vae, vae.config.in_channels


def load_caption_encoder(args, dataset, device):
    """For ``--conditioning text``: the frozen text encoder, its tokenizer and the cache of its caption embeddings."""
    if "text" not in dataset.column_names:
        raise ValueError(f"--conditioning text needs a caption column; the data set has {dataset.column_names}")
    text_encoder, tokenizer = load_text_encoder(args.text_encoder)
    text_encoder.to(device)
    return text_encoder, tokenizer, PromptEmbeddingCache(text_encoder, tokenizer, device, args.text_cache_size)


def prepare_inputs(args, device) -> TrainingInputs:
    """The training set and its frozen encoders; with ``--vae`` every image is encoded once, here."""
    dataset = load_training_data(args)
    if len(dataset) == 0:
        raise ValueError("the training data set is empty")
    vae, channels = load_vae_for(args, args.channels or (1 if args.mnist_npz else 3))
    transform = image_transform(args.resolution, channels, center_crop=args.center_crop, pad=args.pad_images)
    num_classes = (
        count_classes(dataset, args.num_classes, "--conditioning class") if args.conditioning == "class" else None
    )
    text = load_caption_encoder(args, dataset, device) if args.conditioning == "text" else (None, None, None)
    latents, in_channels, sample_size = None, channels, args.resolution
    if vae is not None:
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        if args.resolution % f:
            raise ValueError(f"--resolution {args.resolution} must be divisible by the VAE's downsample factor {f}")
        latents = encode_latents(vae, dataset, transform, args.random_flip, device)
        in_channels, sample_size = vae.config.latent_channels, args.resolution // f
    examples = TrainExamples(dataset, transform, latents, cache_images=may_cache_images(args, dataset, channels))
    return TrainingInputs(examples, in_channels, sample_size, vae, latents, num_classes, *text)


def make_dataloader(args, examples: TrainExamples) -> torch.utils.data.DataLoader:
    """Per-process batches of a seeded epoch permutation (``EpochSampler``); the last partial batch is dropped."""
    return torch.utils.data.DataLoader(
        examples,
        batch_size=args.train_batch_size,
        sampler=EpochSampler(len(examples), args.seed),
        drop_last=True,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
    )


def make_noise_scheduler(args) -> DDPMScheduler:
    """Diffusion's forward process; flow matching only reads num_train_timesteps from args."""
    return DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps,
        beta_schedule=args.beta_schedule,
        beta_start=args.beta_start,
        beta_end=args.beta_end,
        prediction_type=args.prediction_type if args.objective == "diffusion" else "epsilon",
    )


def make_ema(args, model, accelerator) -> EMAModel | None:
    if not args.use_ema:
        return None
    ema = EMAModel(
        model.parameters(),
        decay=args.ema_max_decay,
        use_ema_warmup=True,
        inv_gamma=args.ema_inv_gamma,
        power=args.ema_power,
        model_cls=type(model),
        model_config=model.config,
    )
    attach_ema(accelerator, ema)  # on the device, saved in the checkpoints as safetensors
    return ema


@dataclasses.dataclass
class Trainer:
    """The prepared training objects. ``model`` is what the forward goes through (DDP-wrapped, maybe compiled);
    ``denoiser`` is the plain module inside it, which EMA, the samples and the saved weights read."""

    model: torch.nn.Module
    denoiser: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    dataloader: torch.utils.data.DataLoader
    length: TrainingLength
    noise_scheduler: DDPMScheduler
    ema: EMAModel | None

    def weights(self) -> list[torch.Tensor]:
        """Every tensor a checkpoint must hold finite: the weights and the EMA's shadow copies."""
        return checkpoint_weights(self.denoiser, ema=self.ema)


def check_backend(args, accelerator) -> None:
    """Before any work: LAMB needs whole weight tensors; ``--allow_tf32`` applies from the VAE encoding on."""
    if args.optimizer == "lamb" and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError("--optimizer lamb needs whole weight tensors on every rank (DDP or one process), not shards")
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def prepare_trainer(args, accelerator, inputs: TrainingInputs) -> Trainer:
    model = build_model(args, inputs.in_channels, inputs.sample_size, inputs.num_classes, inputs.text_dim)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)  # before the optimiser and EMA copy the parameters
    optimizer = make_optimizer(model, args)
    ema = make_ema(args, model, accelerator)
    dataloader = make_dataloader(args, inputs.examples)
    length = TrainingLength.of(accelerator, dataloader, args)
    lr_scheduler = length.lr_scheduler(args, optimizer, accelerator.num_processes)
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(model, optimizer, dataloader, lr_scheduler)
    if args.compile:
        model = compile_model(accelerator, model, args.compile_mode)
    denoiser = accelerator.unwrap_model(model, keep_torch_compile=False)  # no _orig_mod. names in the weights
    return Trainer(model, denoiser, optimizer, lr_scheduler, dataloader, length, make_noise_scheduler(args), ema)


# ----------------------------------------------------------------------------------------------------------------------
# One micro-batch's loss
# ----------------------------------------------------------------------------------------------------------------------


class MicroBatchLoss:
    """The loss of one micro-batch. Every draw is made for the global batch, keyed by (seed, step, micro-batch), and
    each process keeps its rows, so 2 processes x batch b train on what 1 process x batch 2b does."""

    def __init__(self, args, accelerator, trainer: Trainer, inputs: TrainingInputs, weight_dtype: torch.dtype):
        self.args, self.accelerator, self.trainer, self.inputs = args, accelerator, trainer, inputs
        self.weight_dtype = weight_dtype
        self.shape = (inputs.in_channels, inputs.sample_size, inputs.sample_size)

    def __call__(self, batch: dict, step: int, micro: int) -> torch.Tensor:
        args, model = self.args, self.trainer.model
        draws = GlobalBatchDraws(self.accelerator, batch["x"].shape[0], args.seed, step, micro)
        levels = draw_noise_levels(args, draws)
        noise = draws.randn(*self.shape)
        flip = draws.rand() < 0.5 if args.random_flip else None
        drop = draws.rand() < args.cond_dropout
        self_cond_global = draws.rand(whole_batch=True) < args.self_cond_prob  # (B,) the same on every rank

        x0 = self.clean_sample(batch, flip, draws)
        cond = self.conditioning(batch, drop)
        noisy, timesteps, target, weights = forward_process(args, self.trainer.noise_scheduler, x0, noise, levels)
        if args.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        if getattr(self.trainer.denoiser, "self_conditioning", False):  # RIN: a no-grad first pass's latents
            cond["prev_latents"] = self_conditioning_latents(
                model, noisy, timesteps, cond, self_cond_global, draws.rows
            )
        # weighted by noise level (min-SNR, flow weighting) where the objective asks for it
        return objective_loss(model(noisy, timesteps, **cond).sample, target, weights)

    def clean_sample(self, batch: dict, flip: torch.Tensor | None, draws: GlobalBatchDraws) -> torch.Tensor:
        """x0 (B, C, h, w): the image, or a latent drawn from its cached posterior; flipped where ``flip`` says."""
        if self.inputs.latents is None:
            x0 = batch["x"]
            return x0 if flip is None else torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        moments = batch["x"]  # (B, [2 orientations,] 2, C, h, w)
        if flip is not None:
            moments = torch.where(flip[:, None, None, None, None], moments[:, 1], moments[:, 0])
        eps_latent = draws.randn(*self.shape)
        return (moments[:, 0] + moments[:, 1] * eps_latent) * self.inputs.vae.config.scaling_factor

    def conditioning(self, batch: dict, drop: torch.Tensor) -> dict:
        """The denoiser's conditioning keywords, dropped (``drop``) to the null input for classifier-free guidance."""
        if self.args.conditioning == "class":
            return {"class_labels": drop_class_labels(batch["label"], drop, self.inputs.num_classes)}
        if self.args.conditioning == "text":
            tokens, mask = self.inputs.embed_prompts(drop_captions(batch["text"], drop))
            return {"encoder_hidden_states": tokens.to(self.weight_dtype), "encoder_attention_mask": mask}
        return {}


# ----------------------------------------------------------------------------------------------------------------------
# The loop and its outputs
# ----------------------------------------------------------------------------------------------------------------------


def make_pipeline(args, trainer: Trainer, inputs: TrainingInputs):
    """The pipeline around the denoiser as it is now (put the EMA weights in first to sample those)."""
    trainer.denoiser.eval()
    sample_scheduler = sampling_scheduler(args, trainer.noise_scheduler)
    return build_pipeline(args, trainer.denoiser, sample_scheduler, inputs.vae, inputs.text_encoder, inputs.tokenizer)


def validate(args, accelerator, trainer: Trainer, inputs: TrainingInputs, step: int) -> list:
    """Sample with the EMA weights (when on), log the grid, and put the training weights back."""
    ema, denoiser = trainer.ema, trainer.denoiser
    if ema is not None:
        ema.store(denoiser.parameters())
        ema.copy_to(denoiser.parameters())
    images = sample_images(args, make_pipeline(args, trainer, inputs), inputs.num_classes, accelerator.device)
    denoiser.train()
    if ema is not None:
        ema.restore(denoiser.parameters())
    log_image_grid(accelerator, "validation", image_grid(images), step)
    return images


def after_update(args, accelerator, trainer: Trainer, inputs, guard: NonFiniteGuard, loss, loop: UpdateLoop) -> None:
    """EMA, logs, checkpoint and validation after update ``loop.global_step``; the same decisions on every rank. The
    logs go out first, so the step a failing checkpoint or validation stops at is still in the trackers."""
    global_step = loop.global_step
    guard.end_update(global_step, trainer.ema, trainer.denoiser)
    loss_mean = accelerator.gather(loss.detach()[None]).mean().item()
    loop.show({"loss": loss_mean, "lr": trainer.lr_scheduler.get_last_lr()[0]})
    checkpoint_if_due(accelerator, args, global_step, guard, trainer.weights)
    if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
        validate(args, accelerator, trainer, inputs, global_step)


def train_loop(args, accelerator, trainer: Trainer, inputs, loss_fn) -> int:
    """Train from the resumed step to ``max_train_steps``; returns the last step."""
    global_step, script_state = load_checkpoint(accelerator, args.resume_from_checkpoint, args.output_dir)
    guard = NonFiniteGuard(accelerator, args.max_nonfinite_steps, script_state)  # the count survives a resume
    accumulation = args.gradient_accumulation_steps
    loop = UpdateLoop(accelerator, trainer.dataloader, trainer.length, global_step, accumulation)
    trainer.model.train()
    for _, index, batch in loop:
        with accelerator.accumulate(trainer.model):
            loss = loss_fn(batch, loop.global_step, index % accumulation)  # keyed by (update, micro-batch)
            guarded_update(accelerator, guard, loss, trainer.optimizer, trainer.model.parameters(),
                           args.max_grad_norm, trainer.lr_scheduler)  # fmt: skip
        if loop.updated():
            after_update(args, accelerator, trainer, inputs, guard, loss, loop)
    return loop.global_step


def save_outputs(args, trainer: Trainer, inputs: TrainingInputs, device, global_step: int) -> None:
    """The pipeline folder (EMA weights when on), a sample grid, and the Hub upload; never non-finite weights."""
    if trainer.ema is not None:
        trainer.ema.copy_to(trainer.denoiser.parameters())
    if not all_finite(trainer.denoiser.parameters()):
        raise RuntimeError("the final weights hold NaN or inf; not saving the pipeline")
    pipeline = make_pipeline(args, trainer, inputs)
    pipeline.save_pretrained(args.output_dir)
    images = sample_images(args, pipeline, inputs.num_classes, device)
    image_grid(images).save(os.path.join(args.output_dir, "samples.png"))
    if args.push_to_hub:
        info = hub_training_info(args, train_steps=global_step)
        pipeline.push_to_hub(args.hub_model_id, training_info=info, images=images, token=args.hub_token)


def main(args: argparse.Namespace) -> None:
    accelerator = make_accelerator(args, seedable_sampler=False)  # the data order is EpochSampler's
    check_backend(args, accelerator)
    inputs = prepare_inputs(args, accelerator.device)
    trainer = prepare_trainer(args, accelerator, inputs)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    if inputs.vae is not None:
        inputs.vae.to(accelerator.device, dtype=weight_dtype)
    start_trackers(accelerator, args, "train_diffusion")

    loss_fn = MicroBatchLoss(args, accelerator, trainer, inputs, weight_dtype)
    global_step = train_loop(args, accelerator, trainer, inputs, loss_fn)

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_outputs(args, trainer, inputs, accelerator.device, global_step)
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
