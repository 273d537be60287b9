"""hfgen: Diffusers-compatible generative image models, pipelines and training scripts.

Every component module is imported here eagerly: diffusers resolves a saved component by the module path of its
class and only finds classes of modules that are already imported.
"""

__version__ = "0.1.0"

from .layers import DenoiserOutput  # noqa: F401

# --- schedulers ---
from .schedulers import DDIMInversionOutput, DDIMScheduler, DDIMSchedulerOutput, DDPMScheduler, DDPMSchedulerOutput  # noqa: F401

# --- unet ---
from .unet import UNET_PRESETS, UNetModel  # noqa: F401

# --- dit ---
from .dit import DIT_PRESETS, DiTBlock, DiTModel  # noqa: F401

# --- rin ---
from .rin import RIN_PRESETS, RINBlock, RINModel  # noqa: F401

# --- autoencoder ---
from .autoencoder import AUTOENCODER_PRESETS, AutoencoderModel, VAEModel  # noqa: F401

# --- gan ---
from .gan import GAN_PRESETS, GANDiscriminator, GANGenerator  # noqa: F401

# --- clip ---
from .clip import clip_score, preprocess_images, train_clip_tokenizer, zero_shot_classify  # noqa: F401

# --- data ---
from .data import (
    COLORS,
    SHAPE_PAIRS,
    SHAPES,
    image_transform,
    load_image_dataset,
    load_mnist_npz,
    make_shapes_dataset,
    shapes_label,
)  # noqa: F401

# --- metrics ---
from .metrics import DigitClassifier  # noqa: F401

# --- pipelines ---
from .pipelines import HFGenTextToImagePipeline  # noqa: F401
from .pipelines import HFGenPipeline  # noqa: F401
from .pipelines import HFGenVAEPipeline, HFGenGANPipeline  # noqa: F401
