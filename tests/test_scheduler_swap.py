"""hfgen's schedulers drive diffusers' own DDPM, DDIM and Stable Diffusion pipelines (tiny random components) and give
the same images as diffusers' schedulers; configs load across the two libraries without warnings."""

import json
import logging
import warnings

import diffusers
import pytest
import torch
import transformers

import hfgen

# leading spacing (diffusers' DDIM stride is right there); SD wants steps_offset=1 and clip_sample=False
SD_SCHEDULER_CONFIG = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
SD_SCHEDULER_CONFIG.update(steps_offset=1, clip_sample=False)
WORDS = ("a", "red", "blue", "circle", "square")


# ----------------------------------------------------------------------------------------------------------------
# Tiny components
# ----------------------------------------------------------------------------------------------------------------


def tiny_unet() -> diffusers.UNet2DModel:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()


def tiny_clip_tokenizer(tmp_path) -> transformers.CLIPTokenizer:
    """A CLIP BPE tokenizer for a handful of words: each word is built by left-to-right merges of its characters."""
    vocab, merges = ["<|startoftext|>", "<|endoftext|>"], []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        for piece in pieces:
            if piece not in vocab:
                vocab.append(piece)
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    (tmp_path / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=8)


def tiny_stable_diffusion_components(tmp_path) -> dict:
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
    )
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        sample_size=16,
    )
    tokenizer = tiny_clip_tokenizer(tmp_path)
    text_config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    text_encoder = transformers.CLIPTextModel(text_config)
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def images_with(pipe, scheduler, **call_kwargs):
    pipe.scheduler = scheduler  # after __init__: DDIMPipeline.__init__ converts any scheduler to diffusers' DDIM
    assert type(pipe.scheduler) is type(scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=torch.Generator().manual_seed(0), output_type="np", **call_kwargs).images


# ----------------------------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_pipeline_same_images(variance_type):
    unet = tiny_unet()
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler())
    config = {"variance_type": variance_type, "num_train_timesteps": 100}
    ours = images_with(pipe, hfgen.DDPMScheduler(**config), num_inference_steps=5)
    theirs = images_with(pipe, diffusers.DDPMScheduler(**config), num_inference_steps=5)
    assert ours.shape == (1, 16, 16, 3)
    assert abs(ours - theirs).max() < 1e-4


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_pipeline_same_images(eta):
    unet = tiny_unet()
    pipe = diffusers.DDIMPipeline(unet=unet, scheduler=diffusers.DDIMScheduler())
    config = {"prediction_type": "v_prediction", "timestep_spacing": "leading"}
    ours = images_with(pipe, hfgen.DDIMScheduler(**config), num_inference_steps=4, eta=eta, batch_size=2)
    theirs = images_with(pipe, diffusers.DDIMScheduler(**config), num_inference_steps=4, eta=eta, batch_size=2)
    assert ours.shape == (2, 16, 16, 3)
    assert abs(ours - theirs).max() < 1e-4


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler"])
def test_stable_diffusion_pipeline_same_images(name, tmp_path):
    pipe = diffusers.StableDiffusionPipeline(
        **tiny_stable_diffusion_components(tmp_path), scheduler=getattr(diffusers, name)(**SD_SCHEDULER_CONFIG)
    )
    tokens = pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("a red circle").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    call = {"prompt": "a red circle", "height": 16, "width": 16, "num_inference_steps": 3, "guidance_scale": 3.0}
    ours = images_with(pipe, getattr(hfgen, name)(**SD_SCHEDULER_CONFIG), **call)
    theirs = images_with(pipe, getattr(diffusers, name)(**SD_SCHEDULER_CONFIG), **call)
    assert ours.shape == (1, 16, 16, 3) and pipe.scheduler.config.steps_offset == 1
    assert abs(ours - theirs).max() < 1e-4


def test_pipeline_with_hfgen_scheduler_saves_and_loads(tmp_path):
    pipe = diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=hfgen.DDPMScheduler(num_train_timesteps=50))
    pipe.save_pretrained(tmp_path)
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is hfgen.DDPMScheduler
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"] == ["hfgen.schedulers", "DDPMScheduler"]


# ----------------------------------------------------------------------------------------------------------------
# from_config across libraries
# ----------------------------------------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


PAIRS = [
    (diffusers.DDPMScheduler, hfgen.DDIMScheduler),
    (diffusers.DDIMScheduler, hfgen.DDPMScheduler),
    (hfgen.DDPMScheduler, diffusers.DDIMScheduler),
    (hfgen.DDIMScheduler, diffusers.DDPMScheduler),
    (hfgen.DDIMScheduler, hfgen.DDPMScheduler),
    (diffusers.DDIMScheduler, hfgen.DDIMScheduler),
    (hfgen.DDPMScheduler, diffusers.DDPMScheduler),
]


@pytest.mark.parametrize(
    "source,target", PAIRS, ids=[f"{s.__module__}-{s.__name__}-to-{t.__module__}" for s, t in PAIRS]
)
def test_from_config_both_ways_without_warnings(source, target):
    config = {"beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "timestep_spacing": "trailing"}
    original = source(**config, steps_offset=1, rescale_betas_zero_snr=True)
    root = diffusers.utils.logging.get_logger("diffusers")
    handler, level = _Records(), root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            converted, unused = target.from_config(original.config, return_unused_kwargs=True)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    assert [r.getMessage() for r in handler.records] == [] and [str(w.message) for w in caught] == []
    assert unused == {}
    assert type(converted) is target
    for key, value in {**config, "steps_offset": 1, "rescale_betas_zero_snr": True}.items():
        assert converted.config[key] == value
    assert torch.equal(converted.alphas_cumprod, original.alphas_cumprod)
