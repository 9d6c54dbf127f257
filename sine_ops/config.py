"""Every setting of the pack, one dataclass per concern, with the reason for each default (docs/method.md §7).

The nodes build their widgets (defaults, choices, tooltips that quote sizes) from these tables, so a default is
written once.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace


@dataclass(frozen=True)
class FamilySizes:
    """Sizes of one model family. SD1.x values are the paper's (docs/method.md §3: 1024 canvas, 512 crops,
    128-cell grid); SD2.x-768 and SDXL scale both sizes with the family's native resolution and keep the 128-cell
    grid, so a cell is 8, 12 or 16 px of the canvas."""
    native: int   # training side (px) of a plain fine-tune, and of every crop in patch mode
    canvas: int   # patch mode: the side the source is stretched to before crops are cut


FAMILY_SIZES = {"sd1": FamilySizes(512, 1024), "sd2": FamilySizes(768, 1536), "sdxl": FamilySizes(1024, 2048)}
DEFAULT_FAMILY = "sd1"  # families outside the table (e.g. sdxl_refiner) train at SD1.x sizes unless set


def family_sizes(family: str) -> FamilySizes:
    return FAMILY_SIZES.get(family, FAMILY_SIZES[DEFAULT_FAMILY])


def sizes_text(attr: str) -> str:
    """'SD1.x 512, SD2.x 768, SDXL 1024' for tooltips, from FAMILY_SIZES."""
    names = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
    return ", ".join(f"{names[f]} {getattr(s, attr)}" for f, s in FAMILY_SIZES.items())


# How the positional grid window is resized to a crop or an output size (bilinear for photos, nearest for
# paintings, as the official painting configs).
INTERPOLATIONS = ("bilinear", "nearest")


RECON_LOSS_WEIGHT = 1.0  # weight of L_rec when PatchConfig.recon_loss is on (official patch configs: scale_recon_loss)


AUTO_CROP_BANK = -1  # PatchConfig.crop_bank: fresh crops where they are cheap, else a bank (PatchConfig.for_device)
BANKED_CROPS = 32    # the bank's size where fresh crops are not cheap (CPU, --lowvram)


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
    crop_bank: int = -1            # AUTO_CROP_BANK: decided by the device (for_device); N > 0: N crops VAE-
                                   # encoded once and reused (a VAE encode is 40-50% of a CPU step); 0 = a fresh
                                   # random crop (one VAE encode) every step, as the official code
    recon_loss: bool = True        # add the official patch configs' L_rec (weight 1.0, docs/method.md §2)

    def for_device(self, fresh_crops_cheap: bool) -> "PatchConfig":
        """crop_bank AUTO_CROP_BANK made concrete: a fresh crop every step (the official pipeline) where a VAE encode
        is cheap beside a training step (on an H200 one 512 px encode costs 0.13 of a step, issue 19), else a bank of
        BANKED_CROPS (on a CPU the encode adds 37% to every step, docs/performance.md)."""
        if self.crop_bank != AUTO_CROP_BANK:
            return self
        return replace(self, crop_bank=0 if fresh_crops_cheap else BANKED_CROPS)

    def resolved(self, family: str) -> "PatchConfig":
        """Fill the family defaults (0 fields) in; validate the geometry."""
        sizes = family_sizes(family)
        if not self.working_size and self.grid_size > 0 and sizes.canvas % self.grid_size:
            # name what the user set: grid_size, against a canvas size they never typed
            raise ValueError(f"grid_size {self.grid_size} does not divide this model's default canvas of "
                             f"{sizes.canvas} px (working_size 0 = family default); use a grid_size that divides "
                             f"{sizes.canvas} (paper: 128) or set working_size to a multiple of {self.grid_size}")
        cfg = replace(self, working_size=self.working_size or sizes.canvas,
                      train_resolution=self.train_resolution or sizes.native)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raises ValueError naming the setting (as the user set it) and the fix."""
        if not 0 < self.min_crop_frac <= self.max_crop_frac <= 1.0:
            raise ValueError(f"crop fractions must satisfy 0 < min ({self.min_crop_frac}) <= max "
                             f"({self.max_crop_frac}) <= 1")
        if not 0.0 <= self.whole_image_prob <= 1.0:
            raise ValueError(f"whole_image_prob must be in [0, 1], got {self.whole_image_prob}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.grid_size < 1:
            raise ValueError(f"grid_size must be at least 1, got {self.grid_size}")
        if self.working_size and self.working_size % self.grid_size:
            raise ValueError(f"working_size {self.working_size} must be a multiple of grid_size {self.grid_size} "
                             "so crops fall on whole grid cells")
        if self.crop_bank < AUTO_CROP_BANK:
            raise ValueError(f"crop_bank must be -1 (auto: by the device), 0 (a fresh crop every step) or more, "
                             f"got {self.crop_bank}")
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


# ---- fine-tuning ---------------------------------------------------------------------------------------------------
METHODS = ("lora", "full")
TEXT_ENCODER_MODES = ("off", "lora", "full")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
RESIZE_MODES = ("stretch", "keep_aspect")
_ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
              "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
# Which UNet layers train, by module-name suffix (SD/LDM naming, as in ComfyUI's UNet); None = every Linear and Conv2d
LAYER_SETS = {
    "attention": _ATTENTION,
    "attention+ff": _ATTENTION + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"),
    "all": None,
}
# Sibling layers that attention calls one after another, the key and value usually on the query's input (self-
# attention) or on one context tensor: while sampling, their LoRA down projections on the same input run as one.
SHARED_INPUT_LAYERS = (("to_q", "to_k", "to_v"), ("q_proj", "k_proj", "v_proj"))
TEXT_ENCODER_LORA_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                            "mlp.fc1", "mlp.fc2")


@dataclass(frozen=True)
class FinetuneSettings:
    """Every choice that changes the trained result (it is also part of the disk-cache key)."""
    steps: int = 400                    # LoRA at 1e-4 overfits one image in a few hundred steps
    learning_rate: float = 1e-4         # LoRA scale; the paper's full fine-tune uses 1e-6
    seed: int = 0
    method: str = "lora"                # "lora" or "full" (dense deltas of every weight and bias of the layers)
    lora_rank: int = 16
    lora_alpha: float = 16.0
    layers: str = "attention"           # LAYER_SETS key: which UNet layers train (both methods)
    text_encoder: str = "off"           # "off", "lora" or "full"; SINE trains it fully
    precision: str = "auto"             # compute dtype on GPU; always fp32 on CPU
    gradient_checkpointing: bool = False
    resize: str = "stretch"             # paper: stretch to the training square; keep_aspect keeps the ratio
    resolution: int = 0                 # training side in px; 0 = the family's native size
    clip_grad_norm: float = 1.0         # ours: bounds a bad first step of a high-lr LoRA; 0 = off (official code)


PRESETS = {
    "custom": {},  # the node's inputs as set (their defaults are lora_default)
    "lora_default": dict(steps=400, learning_rate=1e-4, method="lora", lora_rank=16, lora_alpha=16.0,
                         layers="attention", text_encoder="off"),
    "paper": dict(steps=800, learning_rate=1e-6, method="full", layers="all", text_encoder="full",
                  precision="fp32", gradient_checkpointing=True, clip_grad_norm=0.0),
}
# What a preset sets differently in patch mode (the official patch configs: max_steps 10,000)
PATCH_PRESETS = {"paper": dict(steps=10_000)}


def resolve_settings(preset: str, patch_mode: bool = False, **inputs) -> FinetuneSettings:
    """The node's inputs with the preset's values on top (a preset overrides the inputs it names)."""
    overrides = {**PRESETS[preset], **(PATCH_PRESETS.get(preset, {}) if patch_mode else {})}
    return replace(FinetuneSettings(**inputs), **overrides)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW as the official code: torch defaults except the learning rate, constant, no warmup (docs/method.md §2,
    §7). steps, learning_rate and clip_grad_norm come from FinetuneSettings (their defaults and reasons are there)."""
    steps: int                     # total optimisation steps
    learning_rate: float
    clip_grad_norm: float          # 0 = off, as FinetuneSettings.clip_grad_norm
    weight_decay: float = 0.01     # torch AdamW default, as the official code
    checkpoint_every: int = 0      # call on_checkpoint every N steps (periodic saves); 0 = never
