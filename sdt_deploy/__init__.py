"""sdt-deploy: take a trained Spike-Driven Transformer to NIR and ONNX, spike-exact, with an honest
account of its operations and energy.

The public functions are imported lazily, so that `import sdt_deploy` (and the command line's start)
stays cheap and an interrupt during start-up ends as cleanly as one later on."""
__version__ = "0.1.0"

_LAZY = {"load_model": "api", "quantize": "api", "deploy_graph": "api", "export": "api", "verify": "api",
         "report": "api", "inspect": "api", "run_onnx": "run.onnx_runner", "open_onnx": "run.onnx_runner",
         "run_engine": "run.integer_engine", "run_nir": "run.nir_interpreter", "run_verify": "verification.verifier"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'sdt_deploy' has no attribute {name!r}")
