"""hfgen's Accelerate training scripts (installed as ``hfgen.training``); run them with
``accelerate launch training/<script>.py`` from a checkout or ``accelerate launch -m hfgen.training.<script>``."""
