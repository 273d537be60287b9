"""hfgen's DiffusionPipeline subclasses (installed as ``hfgen.pipelines``)."""

# --- diffusion ---
from .hub import HFGenHubMixin, push_model_to_hub  # noqa: F401
from .pipeline_hfgen import HFGenPipeline  # noqa: F401

# --- text_to_image ---
from .pipeline_text_to_image import HFGenTextToImagePipeline  # noqa: F401

# --- vae ---
from .pipeline_vae import HFGenVAEPipeline  # noqa: F401

# --- gan ---
from .pipeline_gan import HFGenGANPipeline  # noqa: F401
