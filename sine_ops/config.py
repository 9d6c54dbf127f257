"""Settings dataclasses shared by the nodes and the training / sampling code (one place for every default)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

INTERPOLATIONS = ("bilinear", "nearest")

# Native training resolution and SINE working canvas per model family. SD1.x values are the paper's
# (SINE_METHOD.md §3: 1024 canvas, 512 crops, 128-cell grid); SD2.x-768 and SDXL scale both sizes with the
# family's native resolution and keep the 128-cell grid, so a cell is 8, 12 or 16 px of the canvas.
FAMILY_SIZES = {"sd1": (512, 1024), "sd2": (768, 1536), "sdxl": (1024, 2048)}


@dataclass(frozen=True)
class PatchConfig:
    """Patch-based fine-tuning (SINE §3): random crops of a high-res canvas plus a fixed positional grid."""
    working_size: int = 0          # canvas side (px) the source is resized to before cropping; 0 = family default
    train_resolution: int = 0      # side (px) every crop is resized to for training; 0 = family native size
    min_crop_frac: float = 0.1     # smallest crop side as a fraction of the canvas side (each axis drawn alone)
    max_crop_frac: float = 1.0     # largest crop side fraction; 1.0 lets a crop span (almost) a whole axis
    whole_image_prob: float = 0.0  # chance of training on the whole image instead of a crop (LDM: 0, diffusers: 0.1)
    grid_size: int = 128           # grid cells per side; positions 1..G as in the official code (init_size 128)
    interpolation: str = "bilinear"  # how the grid window is resized: bilinear for photos, nearest for paintings
    grid_gate: bool = False        # our option: a learnable scale on the grid, initialised at 0 (off = paper)
    crop_bank: int = 32            # distinct random crops VAE-encoded once and reused (not one VAE pass per step)

    def resolved(self, family: str) -> "PatchConfig":
        """Fill the family defaults (0 fields) in; validate the geometry."""
        native, canvas = FAMILY_SIZES.get(family, FAMILY_SIZES["sd1"])
        cfg = PatchConfig(**{**asdict(self), "working_size": self.working_size or canvas,
                             "train_resolution": self.train_resolution or native})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not 0 < self.min_crop_frac <= self.max_crop_frac <= 1.0:
            raise ValueError(f"crop fractions must satisfy 0 < min ({self.min_crop_frac}) <= max "
                             f"({self.max_crop_frac}) <= 1")
        if not 0.0 <= self.whole_image_prob <= 1.0:
            raise ValueError(f"whole_image_prob must be in [0, 1], got {self.whole_image_prob}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.working_size and self.working_size % self.grid_size:
            raise ValueError(f"working_size {self.working_size} must be a multiple of grid_size {self.grid_size} "
                             "so crops fall on whole grid cells")
        if self.crop_bank < 1:
            raise ValueError(f"crop_bank must be at least 1, got {self.crop_bank}")
        if self.train_resolution and self.train_resolution % 64:
            raise ValueError(f"train_resolution must be a multiple of 64, got {self.train_resolution}")

    @property
    def cell_px(self) -> int:
        return self.working_size // self.grid_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PatchConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
