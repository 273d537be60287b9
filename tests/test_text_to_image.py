"""HFGenTextToImagePipeline with tiny real components (random CLIP text encoder from a config, tiny U-Net / DiT / RIN):
prompt batching, guidance passes, the empty-prompt unconditional input, negative prompts, prompt_embeds, callbacks,
input errors, VAE, save / load / Hub round trips."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from tiny_clip import make_tiny_clip_tokenizer, make_tiny_text_encoder
from tolerances import assert_close_float32

from hfgen import UNET_PRESETS, HFGenTextToImagePipeline, UNetModel
from hfgen.autoencoder import AUTOENCODER_PRESETS, AutoencoderModel
from hfgen.dit import DiTModel
from hfgen.rin import RIN_PRESETS, RINModel
from hfgen.schedulers import DDIMScheduler, DDPMScheduler

STEPS = 2
TEXT_DIM = 32


def randomize_zero_params(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Small random weights in the zero-initialised layers, so the untrained output depends on its inputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def make_denoiser(kind: str, sample_size: int = 8, in_channels: int = 3):
    torch.manual_seed(0)
    if kind == "unet":
        model = UNetModel(
            **UNET_PRESETS["unet-tiny"],
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            cross_attention_dim=TEXT_DIM,
        )
    elif kind == "dit":
        model = DiTModel(
            sample_size=sample_size,
            in_channels=in_channels,
            patch_size=2,
            hidden_size=32,
            depth=2,
            num_heads=2,
            cross_attention_dim=TEXT_DIM,
            learn_sigma=True,
        )
    else:
        model = RINModel(**RIN_PRESETS["RIN-tiny"], sample_size=sample_size, cross_attention_dim=TEXT_DIM)
    return randomize_zero_params(model)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tiny_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"), model_max_length=8)


@pytest.fixture(scope="module")
def text_encoder(tokenizer):
    return make_tiny_text_encoder(tokenizer, hidden_size=TEXT_DIM)


def make_pipe(tokenizer, text_encoder, denoiser=None, scheduler=None, vae=None) -> HFGenTextToImagePipeline:
    pipe = HFGenTextToImagePipeline(
        denoiser=denoiser or make_denoiser("unet"),
        scheduler=scheduler or DDIMScheduler(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae=vae,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tokenizer, text_encoder):
    return make_pipe(tokenizer, text_encoder)


def record_calls(model):
    """Forward hook recording (batch size, encoder_hidden_states, encoder_attention_mask) of each call."""
    calls = []
    model.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(
            (args[0].shape[0], kwargs["encoder_hidden_states"], kwargs["encoder_attention_mask"])
        ),
        with_kwargs=True,
    )
    return calls


# ----------------------------------------------------------------------------------------------------------------------
# Batching and determinism, with each denoiser family
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["unet", "dit", "rin"])
def test_num_images_per_prompt_and_determinism(tokenizer, text_encoder, kind):
    pipe = make_pipe(tokenizer, text_encoder, make_denoiser(kind))
    kwargs = {"num_inference_steps": STEPS, "num_images_per_prompt": 2, "guidance_scale": 3.0, "output_type": "np"}
    a = pipe(["a red circle", "a blue square"], generator=gen(0), **kwargs).images
    b = pipe(["a red circle", "a blue square"], generator=gen(0), **kwargs).images
    c = pipe(["a red circle", "a green square"], generator=gen(0), **kwargs).images
    assert a.shape == (4, 8, 8, 3) and a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:2], c[:2])  # images are grouped by prompt: [p0, p0, p1, p1]
    assert np.abs(a[2:] - c[2:]).max() > 1e-4  # the text reaches the denoiser
    assert pipe.num_timesteps == STEPS and pipe.guidance_scale == 3.0 and pipe.do_classifier_free_guidance


def test_output_types_and_return_dict(pipe):
    pil = pipe("a red circle", num_inference_steps=STEPS, generator=gen()).images
    pt = pipe("a red circle", num_inference_steps=STEPS, generator=gen(), output_type="pt").images
    (latent,) = pipe(
        "a red circle", num_inference_steps=STEPS, generator=gen(), output_type="latent", return_dict=False
    )
    assert len(pil) == 1 and pil[0].size == (8, 8)
    assert pt.shape == (1, 3, 8, 8) and latent.shape == (1, 3, 8, 8)
    torch.testing.assert_close(pt, (latent / 2 + 0.5).clamp(0, 1))


# ----------------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------------------------------------


def test_guidance_one_is_one_pass_and_above_one_doubles_the_batch(tokenizer, text_encoder):
    unet = make_denoiser("unet")
    calls = record_calls(unet)
    pipe = make_pipe(tokenizer, text_encoder, unet)
    pipe(["a red circle", "a blue square"], num_inference_steps=STEPS, guidance_scale=1.0, output_type="pt")
    assert [c[0] for c in calls] == [2] * STEPS and not pipe.do_classifier_free_guidance
    calls.clear()
    pipe(["a red circle", "a blue square"], num_inference_steps=STEPS, guidance_scale=4.0, output_type="pt")
    assert [c[0] for c in calls] == [4] * STEPS
    L = pipe.max_text_length
    assert calls[0][1].shape == (4, L, TEXT_DIM) and calls[0][2].shape == (4, L)


def test_unconditional_input_is_the_empty_prompt_with_its_mask(tokenizer, text_encoder):
    """As in training with caption dropout to "": text tokens = last_hidden_state, mask = the tokenizer's."""
    unet = make_denoiser("unet")
    calls = record_calls(unet)
    pipe = make_pipe(tokenizer, text_encoder, unet)
    pipe("a red circle", num_inference_steps=1, guidance_scale=2.0, output_type="pt")
    _, text, mask = calls[0]
    ids = tokenizer(["a red circle", ""], padding="max_length", max_length=8, return_tensors="pt")
    with torch.no_grad():
        expected = text_encoder(ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
    torch.testing.assert_close(text, expected)  # [cond; uncond]
    assert mask.tolist() == [[1] * 5 + [0] * 3, [1, 1] + [0] * 6]


def test_guidance_combines_conditional_and_unconditional_predictions(tokenizer, text_encoder):
    """One DDIM step to t=0 with eta 0 returns x_0 hat: the guided prediction is linear in s."""
    pipe = make_pipe(tokenizer, text_encoder, scheduler=DDIMScheduler(prediction_type="sample", clip_sample=False))
    out = {}
    for s in (1.0, 2.0, 3.0):
        out[s] = pipe("a red circle", num_inference_steps=1, guidance_scale=s, generator=gen(), output_type="latent")
    x1, x2, x3 = (out[s].images for s in (1.0, 2.0, 3.0))
    # guidance 1 runs a batch of 1, guidance 2 and 3 a batch of 2: the predictions round differently, by a few
    # float32 eps of their magnitude, and the difference of differences carries (1 + s) of it
    assert_close_float32(x3 - x2, x2 - x1, num_eps=256, floor=max(x.abs().max().item() for x in (x1, x2, x3)))
    assert (x2 - x1).abs().max() > 1e-4


def test_negative_prompt(pipe):
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": 3.0, "output_type": "pt"}
    default = pipe(["a red circle", "a blue square"], generator=gen(), **kwargs).images
    empty = pipe(["a red circle", "a blue square"], negative_prompt="", generator=gen(), **kwargs).images
    one = pipe(["a red circle", "a blue square"], negative_prompt="green", generator=gen(), **kwargs).images
    each = pipe(["a red circle", "a blue square"], negative_prompt=["green", ""], generator=gen(), **kwargs).images
    torch.testing.assert_close(default, empty)
    assert (one - default).abs().max() > 1e-4
    torch.testing.assert_close(each[0], one[0])
    torch.testing.assert_close(each[1], default[1])


def test_encode_prompt_returns_embeddings_and_masks(pipe, tokenizer):
    """PixArt's convention: (prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask)."""
    prompts = ["a red circle", "a blue square"]
    embeds, mask, negative, negative_mask = pipe.encode_prompt(prompts, "cpu", 2, True, negative_prompt="green")
    assert embeds.shape == negative.shape == (4, 8, TEXT_DIM) and mask.shape == negative_mask.shape == (4, 8)
    ids = tokenizer([*prompts, "green", "green"], padding="max_length", max_length=8, return_tensors="pt")
    expected = ids.attention_mask.repeat_interleave(2, dim=0)  # one copy per image, grouped by prompt
    assert mask.tolist() == expected[:4].tolist() and negative_mask.tolist() == expected[4:].tolist()
    torch.testing.assert_close(embeds[0], embeds[1], atol=0, rtol=0)

    # without guidance: no negative pair
    embeds, mask, negative, negative_mask = pipe.encode_prompt("a red circle", "cpu", 3, False)
    assert embeds.shape == (3, 8, TEXT_DIM) and mask.shape == (3, 8) and negative is None and negative_mask is None

    # given embeddings without their mask are refused here too
    with pytest.raises(ValueError, match="prompt_embeds need prompt_attention_mask \\(B, L\\)"):
        pipe.encode_prompt(None, "cpu", 1, True, prompt_embeds=embeds)


@pytest.mark.parametrize("kind", ["unet", "dit", "rin"])
@pytest.mark.parametrize("guidance_scale, negative_prompt", [(3.0, "green"), (3.0, None), (1.0, None)])
def test_prompt_embeds_give_the_same_images_as_prompts(tokenizer, text_encoder, kind, guidance_scale, negative_prompt):
    """pipe(prompt=...) == pipe(prompt_embeds=..., masks) from encode_prompt, bit for bit: both paths run the text
    encoder on the same (B, L) batches and the denoiser on the same (2B*n or B*n, ...) batches, so the same kernels
    on the same inputs (float32, CPU) give the same numbers; any tolerance would hide a dropped mask."""
    pipe = make_pipe(tokenizer, text_encoder, make_denoiser(kind))
    prompts = ["a red circle", "a blue square"]  # 5 and 5 of 8 tokens: the masks hide 3 padding tokens each
    do_cfg = guidance_scale > 1
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": guidance_scale, "output_type": "pt"}
    kwargs["num_images_per_prompt"] = 2
    from_text = pipe(prompts, negative_prompt=negative_prompt, generator=gen(), **kwargs).images

    embeds, mask, negative, negative_mask = pipe.encode_prompt(prompts, "cpu", 1, do_cfg, negative_prompt)
    given = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
    if negative_prompt is not None:  # else the pipeline encodes "" itself, padded to the embeddings' L
        given |= {"negative_prompt_embeds": negative, "negative_prompt_attention_mask": negative_mask}
    from_embeds = pipe(**given, generator=gen(), **kwargs).images
    torch.testing.assert_close(from_embeds, from_text, atol=0, rtol=0)

    # the mask matters: attending to the padding tokens changes the images
    unmasked = pipe(**given | {"prompt_attention_mask": torch.ones_like(mask)}, generator=gen(), **kwargs).images
    assert (unmasked - from_text).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------------
# Callbacks
# ----------------------------------------------------------------------------------------------------------------------


def test_callback_sees_tensors_and_can_replace_latents(pipe):
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, int(t), sorted(kwargs), kwargs["latents"].shape, kwargs["prompt_embeds"].shape))
        if i == p.num_timesteps - 1:
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return {}

    out = pipe(
        ["a red circle", "a blue square"],
        num_inference_steps=STEPS,
        guidance_scale=2.0,
        output_type="latent",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "pred_original_sample", "prompt_embeds"],
    ).images
    assert [s[0] for s in seen] == list(range(STEPS))
    assert [s[1] for s in seen] == pipe.scheduler.timesteps.tolist()
    assert seen[0][2] == ["latents", "pred_original_sample", "prompt_embeds"]
    assert seen[0][3] == (2, 3, 8, 8) and seen[0][4] == (2, 8, TEXT_DIM)
    assert torch.count_nonzero(out) == 0


# ----------------------------------------------------------------------------------------------------------------------
# Sizes, VAE, text encoders
# ----------------------------------------------------------------------------------------------------------------------


def test_height_and_width(pipe):
    images = pipe("a red circle", height=16, width=8, num_inference_steps=1, output_type="pt").images
    assert images.shape == (1, 3, 16, 8)


def test_dynamic_shifting_mu_follows_the_patch_count(tokenizer, text_encoder):
    """A Flux-style flow-matching scheduler (``use_dynamic_shifting``) gets diffusers' ``calculate_shift`` of the
    DiT's patch count at the asked size, (16 / 2) x (8 / 2) = 32 tokens, as diffusers' SD3 pipeline computes it."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    config = {"use_dynamic_shifting": True, "base_image_seq_len": 16, "max_image_seq_len": 64}
    pipe = make_pipe(tokenizer, text_encoder, make_denoiser("dit"), FlowMatchEulerDiscreteScheduler(**config))
    images = pipe("a red circle", height=16, width=8, num_inference_steps=4, output_type="pt").images
    assert images.shape == (1, 3, 16, 8)
    reference = FlowMatchEulerDiscreteScheduler(**config)
    reference.set_timesteps(4, mu=calculate_shift(32, 16, 64, 0.5, 1.15))
    torch.testing.assert_close(pipe.scheduler.sigmas, reference.sigmas)


def test_latent_diffusion_with_vae(tokenizer, text_encoder):
    torch.manual_seed(0)
    vae = AutoencoderModel(**AUTOENCODER_PRESETS["ae-tiny"], sample_size=16, scaling_factor=0.5).eval()
    pipe = make_pipe(tokenizer, text_encoder, make_denoiser("unet", sample_size=4, in_channels=4), vae=vae)
    assert pipe.vae_scale_factor == 4
    latents = pipe("a red circle", num_inference_steps=STEPS, generator=gen(), output_type="latent").images
    images = pipe("a red circle", num_inference_steps=STEPS, generator=gen(), output_type="pt").images
    assert latents.shape == (1, 4, 4, 4) and images.shape == (1, 3, 16, 16)  # default size: sample_size x 4
    with torch.no_grad():
        torch.testing.assert_close(images, (vae.decode(latents / 0.5).sample / 2 + 0.5).clamp(0, 1))
    with pytest.raises(ValueError, match="multiples of 8 .*downsample_factor 2 x the VAE's 4.*got 12x16"):
        pipe("a red circle", height=12, num_inference_steps=1)


def test_text_encoder_with_projection(tokenizer):
    text_encoder = make_tiny_text_encoder(tokenizer, hidden_size=TEXT_DIM, projection_dim=16, with_projection=True)
    pipe = make_pipe(tokenizer, text_encoder)
    images = pipe("a red circle", num_inference_steps=1, output_type="pt").images
    assert images.shape == (1, 3, 8, 8)


def test_text_width_must_match_cross_attention_dim(tokenizer, text_encoder):
    wide = make_tiny_text_encoder(tokenizer, hidden_size=48)
    with pytest.raises(
        ValueError, match="cross_attention_dim \\(32\\) must equal the text encoder's hidden_size \\(48\\)"
    ):
        make_pipe(tokenizer, wide)


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------------------------


EMBEDS = torch.zeros(2, 8, TEXT_DIM)
MASK = torch.ones(2, 8, dtype=torch.long)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"prompt": "a", "prompt_embeds": EMBEDS}, ValueError, "either prompt or prompt_embeds, not both"),
        ({}, ValueError, "pass prompt .* or prompt_embeds .*got neither"),
        ({"prompt": 3}, TypeError, "prompt must be a string or a list of strings"),
        ({"prompt": ["a", "b"], "negative_prompt": ["c"]}, ValueError, "negative_prompt has 1 entries but there are 2"),
        (
            {"prompt_embeds": EMBEDS, "negative_prompt_embeds": EMBEDS[:1]},
            ValueError,
            "negative_prompt_embeds need prompt_embeds of the same shape",
        ),
        ({"prompt_embeds": torch.zeros(2, 8, 5)}, ValueError, "prompt_embeds must have shape \\(B, L, 32\\)"),
        ({"prompt_embeds": EMBEDS}, ValueError, "^prompt_embeds need prompt_attention_mask \\(B, L\\), as returned by"),
        (
            {"prompt_embeds": EMBEDS, "prompt_attention_mask": MASK, "negative_prompt_embeds": EMBEDS},
            ValueError,
            "^negative_prompt_embeds need negative_prompt_attention_mask \\(B, L\\), as returned by encode_prompt",
        ),
        (
            {"prompt": "a", "prompt_attention_mask": MASK},
            ValueError,
            "^prompt_attention_mask needs prompt_embeds and must have their shape \\(B, L\\)",
        ),
        (
            {"prompt_embeds": EMBEDS, "prompt_attention_mask": MASK[:, :4]},
            ValueError,
            "^prompt_attention_mask needs prompt_embeds and must have their shape",
        ),
        (
            {"prompt_embeds": EMBEDS, "prompt_attention_mask": MASK, "negative_prompt_attention_mask": MASK},
            ValueError,
            "^negative_prompt_attention_mask needs negative_prompt_embeds",
        ),
        ({"prompt": "a", "guidance_scale": -1.0}, ValueError, "guidance_scale must be >= 1 .*got -1.0"),
        ({"prompt": "a", "height": 9}, ValueError, "height and width must be positive multiples of 2 .*got 9x8"),
        ({"prompt": "a", "width": 7}, ValueError, "multiples of 2 .*got 8x7"),
        ({"prompt": "a", "num_inference_steps": 0}, ValueError, "num_inference_steps must be an int >= 1"),
        ({"prompt": "a", "num_images_per_prompt": 0}, ValueError, "num_images_per_prompt must be an int >= 1"),
        ({"prompt": "a", "output_type": "jpg"}, ValueError, "output_type must be one of"),
        ({"prompt": "a", "latents": torch.zeros(1, 3, 4, 4)}, ValueError, "latents must have shape \\(1, 3, 8, 8\\)"),
        ({"prompt": ["a", "b"], "generator": [gen()]}, ValueError, "list of 1 generators, but 2 images"),
        (
            {"prompt": "a", "callback_on_step_end_tensor_inputs": ["noise"]},
            ValueError,
            "callback_on_step_end_tensor_inputs has unknown names \\['noise'\\]",
        ),
    ],
)
def test_bad_inputs(pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        pipe(**{"num_inference_steps": 1, **kwargs})


def test_missing_masks_are_caught_by_check_inputs(pipe):
    """Before any text encoding or denoising, as PixArt's check_inputs does."""
    with pytest.raises(ValueError, match="^prompt_embeds need prompt_attention_mask"):
        pipe.check_inputs(None, 8, 8, 1, 3.0, 1, prompt_embeds=EMBEDS)
    with pytest.raises(ValueError, match="^negative_prompt_embeds need negative_prompt_attention_mask"):
        pipe.check_inputs(None, 8, 8, 1, 3.0, 1, None, EMBEDS, EMBEDS, MASK)


def test_size_must_divide_by_the_dit_patch(tokenizer, text_encoder):
    pipe = make_pipe(tokenizer, text_encoder, make_denoiser("dit"))
    with pytest.raises(ValueError, match="multiples of 2 \\(the denoiser's downsample_factor 2"):
        pipe("a red circle", height=10, width=9, num_inference_steps=1)


# ----------------------------------------------------------------------------------------------------------------------
# Save / load / Hub
# ----------------------------------------------------------------------------------------------------------------------


def test_save_load_round_trips(tokenizer, text_encoder, tmp_path, monkeypatch):
    pipe = make_pipe(tokenizer, text_encoder, make_denoiser("dit"), scheduler=DDPMScheduler())
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": 2.0, "output_type": "np"}
    expected = pipe(["a red circle", "a blue square"], generator=gen(), **kwargs).images
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]

    # 1. folder
    loaded = HFGenTextToImagePipeline.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(loaded(["a red circle", "a blue square"], generator=gen(), **kwargs).images, expected)

    # 2. plain diffusers, through the saved pipeline.py
    generic = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    generic.set_progress_bar_config(disable=True)
    assert type(generic).__name__ == "HFGenTextToImagePipeline"
    np.testing.assert_array_equal(
        generic(["a red circle", "a blue square"], generator=gen(), **kwargs).images, expected
    )

    # 3. a Hub repo id read offline from the cache layout
    cache = tmp_path / "hub"
    snapshot = cache / "models--user--tiny-t2i" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (cache / "models--user--tiny-t2i" / "refs").mkdir()
    (cache / "models--user--tiny-t2i" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from_hub = HFGenTextToImagePipeline.from_pretrained("user/tiny-t2i", cache_dir=cache, local_files_only=True)
    from_hub.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(
        from_hub(["a red circle", "a blue square"], generator=gen(), **kwargs).images, expected
    )

    # 4. push_to_hub: one upload of the folder with samples and a text-to-image model card
    from hfgen.pipelines import hub

    uploaded = {}

    def fake_upload(folder, repo_id, token, private, commit_message, create_pr):
        uploaded.update(repo_id=repo_id, files=sorted(os.listdir(folder)))
        with open(os.path.join(folder, "README.md")) as f:
            uploaded["card"] = f.read()

    monkeypatch.setattr(hub, "_upload", fake_upload)
    pipe.push_to_hub("user/tiny-t2i", training_info={"max_train_steps": 10}, num_sample_images=2)
    assert uploaded["repo_id"] == "user/tiny-t2i"
    assert {"model_index.json", "pipeline.py", "README.md", "samples.png", "text_encoder", "tokenizer"} <= set(
        uploaded["files"]
    )
    assert "pipeline_tag: text-to-image" in uploaded["card"] and "HFGenTextToImagePipeline" in uploaded["card"]
