"""SINE for ComfyUI: single-image editing with text-to-image diffusion models (Zhang et al., CVPR 2023).

ComfyUI loads this folder from custom_nodes/ and calls `comfy_entrypoint`. Imported anywhere else (pytest,
packaging tools) it registers nothing and needs nothing beyond the standard library.
"""
try:
    import comfy_api.latest  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    pass
else:
    from .nodes import comfy_entrypoint  # noqa: F401
