"""Custom socket types of this pack (values travel between nodes as plain Python objects)."""
from comfy_api.latest import io

PatchConfigType = io.Custom("SINE_PATCH_CONFIG")
AdapterType = io.Custom("SINE_ADAPTER")
GuidanceStackType = io.Custom("SINE_GUIDANCE_STACK")
