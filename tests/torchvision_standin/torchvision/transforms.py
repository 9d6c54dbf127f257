"""Import-only stand-in (see the package docstring)."""


def __getattr__(name):
    raise AttributeError(f"torchvision.transforms.{name} is not available: import-only stand-in")
