"""hfgen: Diffusers-compatible generative image models, pipelines and training scripts.

Every component module is imported here eagerly: diffusers resolves a saved component by the module path of its
class and only finds classes of modules that are already imported.
"""

__version__ = "0.1.0"

from .layers import DenoiserOutput  # noqa: F401

# --- schedulers ---
# --- unet ---
# --- dit ---
# --- rin ---
# --- autoencoder ---
# --- gan ---
# --- clip ---
# --- data ---
# --- metrics ---
# --- pipelines ---
