"""training/train_diffusion.py: tiny real runs in-process, one killed subprocess and one 2-process launch."""

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import sigkill_when_exists
from PIL import Image
from safetensors.torch import load_file

from hfgen import RINModel
from hfgen.pipelines import HFGenPipeline
from hfgen.training.train_diffusion import main, parse_args

SCRIPT = Path(__file__).resolve().parents[1] / "training" / "train_diffusion.py"
# 32 shapes at 16x16, 4 per batch: 8 batches per epoch
TINY = [
    "--model", "unet", "--model_config", "unet-tiny", "--resolution", "16", "--shapes_num_images", "32",
    "--train_batch_size", "4", "--num_inference_steps", "2", "--num_validation_images", "2", "--report_to", "none",
    "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "2", "--learning_rate", "1e-3",
    "--objective", "diffusion",  # the DDPM objective here; tests/test_flow_matching.py runs the default, flow matching
]  # fmt: skip
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(tmp, *extra):
    main(parse_args([*TINY, "--output_dir", str(tmp), *extra]))


def weights(folder) -> dict:
    return load_file(os.path.join(folder, "denoiser", "diffusion_pytorch_model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for k, value in a.items():
        torch.testing.assert_close(value, b[k], rtol=0, atol=atol, msg=k)


def checkpoints(folder) -> list[str]:
    return sorted(d for d in os.listdir(folder) if d.startswith("checkpoint-"))


# ----------------------------------------------------------------------------------------------------------------------
# In-process runs
# ----------------------------------------------------------------------------------------------------------------------


def test_resume_from_latest_equals_uninterrupted(tmp_path):
    """6 updates straight == 3 updates, then resume from ``latest`` to 6; with gradient accumulation over 2
    micro-batches (so resuming skips 6 batches mid-epoch, and step 4 crosses into epoch 2), EMA and LR warmup."""
    common = ["--gradient_accumulation_steps", "2", "--use_ema", "--ema_max_decay", "0.9", "--checkpointing_steps", "3"]
    run(tmp_path / "straight", *common, "--max_train_steps", "6")
    run(tmp_path / "split", *common, "--max_train_steps", "3", "--checkpoints_total_limit", "1")
    assert checkpoints(tmp_path / "split") == ["checkpoint-3"]
    run(tmp_path / "split", *common, "--max_train_steps", "6", "--resume_from_checkpoint", "latest",
        "--checkpoints_total_limit", "1")  # fmt: skip
    assert checkpoints(tmp_path / "split") == ["checkpoint-6"]  # continued at step 3, pruned the old one
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "split"), atol=1e-6)

    # the output folder is a pipeline that loads and samples
    pipe = HFGenPipeline.from_pretrained(tmp_path / "split")
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert images.images.shape == (2, 3, 16, 16)
    assert (tmp_path / "split" / "samples.png").exists()


def test_class_conditional_dit_and_push(tmp_path, monkeypatch):
    from hfgen.pipelines import hub

    uploads = []

    def fake_upload(folder, repo_id, *args, **kwargs):
        uploads.append((repo_id, sorted(os.listdir(folder)), Path(folder, "README.md").read_text()))

    monkeypatch.setattr(hub, "_upload", fake_upload)
    run(tmp_path, "--model", "dit", "--model_config", "DiT-tiny/2", "--conditioning", "class", "--resolution", "8",
        "--max_train_steps", "2", "--prediction_type", "v_prediction", "--snr_gamma", "5",
        "--push_to_hub", "--hub_model_id", "someone/shapes-dit")  # fmt: skip
    [(repo_id, files, card)] = uploads
    assert repo_id == "someone/shapes-dit" and "model_index.json" in files and "samples.png" in files
    assert "v_prediction" in card and "DiT-tiny/2" in card
    pipe = HFGenPipeline.from_pretrained(tmp_path)
    assert type(pipe.denoiser).__name__ == "DiTModel"
    assert pipe.denoiser.config.num_classes == 18  # all (colour, shape) pairs; label 18 is the null label
    out = pipe(batch_size=2, class_labels=[0, 17], guidance_scale=2.0, num_inference_steps=2, output_type="np")
    assert out.images.shape == (2, 8, 8, 3)


def test_rin_self_conditioning(tmp_path, monkeypatch):
    """Training passes: a no-grad first pass with prev_latents=None, then prev_latents with the first pass's latents
    for the self-conditioned rows and zeros (what None means to RINModel) for the others."""
    calls = []
    forward = RINModel.forward

    def recording_forward(self, sample, *args, **kwargs):
        prev = kwargs.get("prev_latents")
        out = forward(self, sample, *args, **kwargs)
        calls.append((torch.is_grad_enabled(), None if prev is None else prev.detach().clone(), out.latents.detach()))
        return out

    monkeypatch.setattr(RINModel, "forward", recording_forward)
    run(tmp_path, "--model", "rin", "--model_config", "RIN-tiny", "--max_train_steps", "2", "--self_cond_prob", "0.5",
        "--train_batch_size", "8", "--num_validation_images", "1")  # fmt: skip
    training = calls[:4]  # 2 steps x (first pass, real pass); sampling follows
    assert [grad for grad, _, _ in training] == [False, True, False, True]
    assert training[0][1] is None
    prev, first_latents = training[1][1], training[0][2]
    row_is_zero = (prev == 0).flatten(1).all(dim=1)
    assert 0 < row_is_zero.sum() < 8, row_is_zero  # some rows self-conditioned, some not
    # the first pass ran on the self-conditioning rows only, and its latents are theirs
    assert len(first_latents) == int((~row_is_zero).sum())
    torch.testing.assert_close(prev[~row_is_zero], first_latents)
    assert HFGenPipeline.from_pretrained(tmp_path).denoiser.config.num_latents == 8


def test_label_dropout_sends_the_null_label_and_the_defaults_are_the_issues(tmp_path, monkeypatch):
    from hfgen import UNetModel

    defaults = parse_args(["--output_dir", str(tmp_path)])
    assert defaults.cond_dropout == 0.1 and defaults.self_cond_prob == 0.9  # 10% label dropout, RIN's 0.9
    assert defaults.objective == "flow_matching" and defaults.prediction_type is None  # the measured better one
    seen = []
    forward = UNetModel.forward

    def recording_forward(self, sample, timestep, class_labels=None, **kwargs):
        if torch.is_grad_enabled():  # training passes only, not the validation samples
            seen.append(class_labels.clone())
        return forward(self, sample, timestep, class_labels=class_labels, **kwargs)

    monkeypatch.setattr(UNetModel, "forward", recording_forward)
    labels = {}
    for dropout in ("0", "0.5"):
        seen.clear()
        run(tmp_path / dropout, "--conditioning", "class", "--cond_dropout", dropout, "--max_train_steps", "6")
        labels[dropout] = torch.cat(seen)
    null = HFGenPipeline.from_pretrained(tmp_path / "0").denoiser.config.num_classes
    assert len(labels["0"]) == 24 and not (labels["0"] == null).any() and (labels["0"] < null).all()
    dropped = (labels["0.5"] == null).float().mean().item()  # the same batches and seed: only the dropout differs
    assert 0.2 < dropped < 0.8, dropped
    kept = labels["0.5"] != null
    assert torch.equal(labels["0.5"][kept], labels["0"][kept])  # the other rows keep their own label


def test_nonfinite_loss_stops_without_nan_checkpoints(tmp_path):
    with pytest.raises(RuntimeError, match="non-finite"):
        run(tmp_path, "--learning_rate", "1e30", "--lr_scheduler", "constant", "--max_train_steps", "20",
            "--checkpointing_steps", "1", "--max_nonfinite_steps", "3", "--max_grad_norm", "0")  # fmt: skip
    written = checkpoints(tmp_path)
    assert written, "expected the checkpoints before and between the skipped steps"
    for name in written:
        for key, value in load_file(tmp_path / name / "model.safetensors").items():
            assert torch.isfinite(value).all(), (name, key)
    assert not (tmp_path / "model_index.json").exists()
    # the count of skipped updates travels in the checkpoints, so a resumed run does not start again from 0
    counts = [json.loads((tmp_path / n / "hfgen_script_state.json").read_text())["nonfinite_steps"] for n in written]
    assert counts == sorted(counts) and counts[-1] == 2, counts  # the run stopped at the 3rd
    last = max(int(n.split("-")[1]) for n in written)
    with pytest.raises(RuntimeError, match=rf"stopping at step {last + 1}: 3 updates"):  # one more bad update ends it
        run(tmp_path, "--learning_rate", "1e30", "--lr_scheduler", "constant", "--max_train_steps", "20",
            "--checkpointing_steps", "1", "--max_nonfinite_steps", "3", "--max_grad_norm", "0",
            "--resume_from_checkpoint", "latest")  # fmt: skip
    # an update that turns the weights themselves non-finite: the checkpoint is refused, not written
    with pytest.raises(RuntimeError, match="refusing to write checkpoint-1"):
        run(tmp_path / "inf", "--learning_rate", "inf", "--max_train_steps", "2", "--checkpointing_steps", "1",
            "--max_grad_norm", "0")  # fmt: skip
    assert checkpoints(tmp_path / "inf") == []


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"--model_config 'unet-huge' .*unet-tiny"):
        parse_args(["--model_config", "unet-huge", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--resume_from_checkpoint"):
        parse_args(["--resume_from_checkpoint", str(tmp_path / "checkpoint-7"), "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--text_encoder"):
        parse_args(["--conditioning", "text", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--shapes_exclude"):
        parse_args(["--shapes_exclude", "purple circle", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--resolution 18 .*divisible by 4"):
        run(tmp_path / "a", "--resolution", "18", "--model_config", "unet-small")  # 3 levels: factor 4
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(folder / f"{i}.png")
    with pytest.raises(ValueError, match=r"label_column 'cls' .*\['image'\]"):
        run(tmp_path / "b", "--train_data_dir", str(folder), "--conditioning", "class", "--label_column", "cls")


# ----------------------------------------------------------------------------------------------------------------------
# Subprocesses: SIGKILL mid-run, and 2 processes
# ----------------------------------------------------------------------------------------------------------------------


def test_sigkill_then_resume_latest_matches_uninterrupted(tmp_path):
    """A real run killed by SIGKILL right after its first checkpoint (possibly while writing the next one), resumed
    with ``--resume_from_checkpoint latest``, ends with the weights of an uninterrupted run."""
    args = [*TINY, "--max_train_steps", "40", "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2"]
    killed = tmp_path / "killed"
    command = [sys.executable, str(SCRIPT), *args, "--output_dir", str(killed)]
    assert sigkill_when_exists(command, SUBPROCESS_ENV, killed / "checkpoint-2", timeout=120) == -signal.SIGKILL
    assert not (killed / "model_index.json").exists(), "the run finished before the kill"

    main(parse_args([*args, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"]))
    main(parse_args([*args, "--output_dir", str(tmp_path / "straight")]))
    assert not list(killed.glob(".tmp-checkpoint-*"))
    # subprocess and this process may use different matmul kernels/threads: allow float round-off
    assert_same_weights(weights(killed), weights(tmp_path / "straight"), atol=1e-6)


def tiny_text_encoder_folder(folder: Path) -> Path:
    """A random 1-layer CLIP text encoder and a tokenizer trained on the shapes captions, saved as --text_encoder."""
    from transformers import CLIPTextModel

    from hfgen.clip import small_clip_config, train_clip_tokenizer
    from hfgen.data import SHAPE_PAIRS

    tokenizer = train_clip_tokenizer([f"a {c} {s}" for c, s in SHAPE_PAIRS], vocab_size=300, model_max_length=8)
    config = small_clip_config(tokenizer, text_width=32, text_layers=1, num_heads=2, vision_width=32, vision_layers=1,
                               projection_dim=32)  # fmt: skip
    torch.manual_seed(0)
    CLIPTextModel(config.text_config).save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    return folder


def test_text_conditioning_and_tensorboard(tmp_path):
    from hfgen.pipelines import HFGenTextToImagePipeline

    encoder_dir = tiny_text_encoder_folder(tmp_path / "clip")
    out = tmp_path / "out"
    run(out, "--conditioning", "text", "--text_encoder", str(encoder_dir), "--max_train_steps", "2",
        "--validation_steps", "2", "--validation_prompts", "a red circle", "--report_to", "tensorboard")  # fmt: skip
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    pipe = HFGenTextToImagePipeline.from_pretrained(out)
    assert pipe.denoiser.config.cross_attention_dim == 32
    images = pipe(prompt=["a blue square"], num_inference_steps=2, guidance_scale=2.0, output_type="np").images
    assert images.shape == (1, 16, 16, 3)


def test_text_encoder_with_projection_loads_as_clip_text_model_without_a_load_report(tmp_path):
    """train_clip.py saves text_encoder/ as CLIPTextModelWithProjection; --text_encoder reads its text tower quietly."""
    import logging

    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from hfgen.training.train_diffusion import load_text_encoder

    folder = tiny_text_encoder_folder(tmp_path)
    plain = CLIPTextModel.from_pretrained(folder / "text_encoder")
    torch.manual_seed(1)
    with_projection = CLIPTextModelWithProjection(plain.config)
    with_projection.text_model.load_state_dict(plain.state_dict())
    with_projection.save_pretrained(folder / "text_encoder")

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        encoder, tokenizer = load_text_encoder(str(folder))
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [r for r in records if "LOAD REPORT" in r.getMessage()]
    assert type(encoder) is CLIPTextModel and not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    ids = tokenizer(["a red circle"], padding="max_length", max_length=8, return_tensors="pt")
    with torch.no_grad():  # the same weights and ops: the same hidden states
        assert torch.equal(encoder(**ids).last_hidden_state, with_projection(**ids).last_hidden_state)


def test_prompt_cache_encodes_each_caption_once_and_matches_encoding(tmp_path):
    from hfgen.training.train_diffusion import PromptEmbeddingCache, encode_prompts, load_text_encoder

    encoder, tokenizer = load_text_encoder(str(tiny_text_encoder_folder(tmp_path)))
    encoded = []
    forward = encoder.forward

    def counting_forward(*args, input_ids=None, **kwargs):
        encoded.append(input_ids.shape[0])
        return forward(*args, input_ids=input_ids, **kwargs)

    encoder.forward = counting_forward
    cache = PromptEmbeddingCache(encoder, tokenizer, "cpu", max_entries=3)
    prompts = ["a red circle", "", "a blue square", "a red circle", ""]
    tokens, mask = cache(prompts)
    assert encoded == [3]  # the three distinct captions, once
    direct_tokens, direct_mask = encode_prompts(encoder, tokenizer, prompts, "cpu")
    torch.testing.assert_close(tokens, direct_tokens, rtol=1e-5, atol=1e-6)
    assert torch.equal(mask, direct_mask)
    encoded.clear()
    cache(["a blue square", "a red circle"])
    assert encoded == []  # all cached
    cache(["a green triangle"])  # the least recently used ("") is dropped
    assert encoded == [1] and list(cache.rows) == ["a blue square", "a red circle", "a green triangle"]
    encoded.clear()
    PromptEmbeddingCache(encoder, tokenizer, "cpu", max_entries=0)(["a red circle", "a red circle"])
    assert encoded == [2]  # off: every caption encoded


def test_cached_text_embeddings_train_as_re_encoding(tmp_path):
    encoder_dir = tiny_text_encoder_folder(tmp_path / "clip")
    for size in ("0", "1024"):
        run(tmp_path / size, "--conditioning", "text", "--text_encoder", str(encoder_dir), "--max_train_steps", "3",
            "--checkpointing_steps", "100", "--num_validation_images", "1", "--text_cache_size", size)  # fmt: skip
    assert_same_weights(weights(tmp_path / "0"), weights(tmp_path / "1024"), atol=1e-5)
    with pytest.raises(ValueError, match="--text_cache_size"):
        parse_args([*TINY, "--output_dir", str(tmp_path), "--text_cache_size", "-1"])


def test_vae_latents(tmp_path, monkeypatch):
    """--vae trains on latents encoded once (not every epoch); the pipeline folder includes the VAE."""
    from hfgen import VAEModel
    from hfgen.autoencoder import AUTOENCODER_PRESETS

    VAEModel(**AUTOENCODER_PRESETS["ae-tiny"], sample_size=16).save_pretrained(tmp_path / "vae")
    encode_calls = []
    encode = VAEModel.encode
    monkeypatch.setattr(VAEModel, "encode", lambda self, x, **kw: encode_calls.append(len(x)) or encode(self, x, **kw))
    # 32 images, 4 per batch: 10 steps are 1.25 epochs
    run(tmp_path / "out", "--vae", str(tmp_path / "vae"), "--max_train_steps", "10", "--random_flip",
        "--num_validation_images", "1")  # fmt: skip
    assert sum(encode_calls) == 2 * 32  # every image once, in both orientations (--random_flip)
    pipe = HFGenPipeline.from_pretrained(tmp_path / "out")
    assert type(pipe.vae).__name__ == "VAEModel" and pipe.denoiser.config.in_channels == 4
    assert pipe.denoiser.config.sample_size == 4  # 16 / f, f = 4
    assert pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)


def test_mnist_class_conditional(tmp_path, mnist_path):
    run(tmp_path, "--mnist_npz", str(mnist_path), "--resolution", "32", "--pad_images", "--conditioning", "class",
        "--max_train_steps", "1", "--num_validation_images", "1")  # fmt: skip
    pipe = HFGenPipeline.from_pretrained(tmp_path)
    assert pipe.denoiser.config.in_channels == 1 and pipe.denoiser.config.num_classes == 10


def test_mixed_precision_defaults_to_accelerates_setting(tmp_path, monkeypatch):
    """No --mixed_precision: the Accelerate setting (here ``ACCELERATE_MIXED_PRECISION=bf16``, as ``accelerate
    launch --mixed_precision bf16`` exports it) decides; an explicit flag still wins."""
    from accelerate import Accelerator

    import hfgen.training_utils as script  # every script's make_accelerator builds its Accelerator there

    seen = []

    class RecordingAccelerator(Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.mixed_precision)

    from accelerate.state import AcceleratorState

    monkeypatch.setattr(script, "Accelerator", RecordingAccelerator)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert parse_args(["--output_dir", str(tmp_path)]).mixed_precision is None
    try:  # Accelerate keeps one state per process: start each run, and the next test, from a fresh one
        for folder, flag in (("env", []), ("flag", ["--mixed_precision", "no"])):
            AcceleratorState._reset_state(reset_partial_state=True)
            run(tmp_path / folder, "--max_train_steps", "1", "--checkpointing_steps", "1", *flag)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert seen == ["bf16", "no"]
