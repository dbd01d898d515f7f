"""sdt-deploy: take a trained Spike-Driven Transformer to NIR and ONNX, spike-exact, with an honest
account of its operations and energy."""
__version__ = "0.1.0"

from .api import deploy_graph, quantize  # noqa: E402
from .checkpoint import load_model  # noqa: E402

__all__ = ["__version__", "deploy_graph", "load_model", "quantize"]
