"""hfgen's DiffusionPipeline subclasses (installed as ``hfgen.pipelines``)."""

# --- diffusion ---
# --- text_to_image ---
# --- vae ---
# --- gan ---
