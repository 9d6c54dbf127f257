"""Patch Resolution Config: settings for SINE's patch-based fine-tuning (docs/method.md §3)."""
from comfy_api.latest import io

from ..sine_ops.config import AUTO_CROP_BANK, INTERPOLATIONS, PatchConfig, sizes_text
from .errors import InputError, node_errors
from .types import PatchConfigType

_D = PatchConfig()


class PatchResolutionConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SINE_PatchResolutionConfig",
            display_name="SINE Patch Resolution Config",
            category="SINE",
            description="Turns SINE Finetune into patch-based fine-tuning: it trains on random crops of a high-res "
                        "canvas with a positional grid, so the fine-tuned model can render the whole image at other "
                        "sizes and aspect ratios. Connect to SINE Finetune's patch_config.",
            inputs=[
                io.Int.Input("working_size", default=_D.working_size, min=0, max=8192, step=64,
                             tooltip="Side in pixels of the canvas the source image is stretched to before crops are "
                                     f"cut. 0 = model family default ({sizes_text('canvas')}; SD1.x as the paper). "
                                     "Larger keeps more fine detail in small crops."),
                io.Int.Input("train_resolution", default=_D.train_resolution, min=0, max=2048, step=64,
                             tooltip="Side in pixels every crop is resized to for training. 0 = the family's native "
                                     f"size ({sizes_text('native')}). Lower is faster and uses less memory."),
                io.Float.Input("min_crop_frac", default=_D.min_crop_frac, min=0.01, max=1.0, step=0.01,
                               tooltip="Smallest crop side as a fraction of the canvas side; height and width are "
                                       "drawn independently. Small crops teach detail, large ones layout "
                                       "(paper: 0.1)."),
                io.Float.Input("max_crop_frac", default=_D.max_crop_frac, min=0.01, max=1.0, step=0.01,
                               tooltip="Largest crop side fraction (paper: 1.0)."),
                io.Float.Input("whole_image_prob", default=_D.whole_image_prob, min=0.0, max=1.0, step=0.05,
                               tooltip="Chance a training step uses the whole image instead of a crop. The paper's "
                                       "code uses 0 (always crop); 0.1 helps the model keep the global layout."),
                io.Int.Input("grid_size", default=_D.grid_size, min=8, max=512, step=8,
                             tooltip="Positional grid cells per side (paper: 128). Crop boxes snap to whole cells; "
                                     "the canvas side must be a multiple of it."),
                io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default=_D.interpolation,
                               tooltip="How the grid is resized to a crop or an output size: bilinear for photos, "
                                       "nearest for paintings (as the paper's painting model). Sampling reuses the "
                                       "training choice."),
                io.Boolean.Input("grid_gate", default=_D.grid_gate,
                                 tooltip="Off = paper-exact grid amplitude. On = a learnable scale on the grid that "
                                         "starts at 0, so the fine-tuned model starts identical to the base."),
                io.Int.Input("crop_bank", default=_D.crop_bank, min=AUTO_CROP_BANK, max=1024,
                             tooltip="-1 (auto): a fresh crop every step on a GPU that holds the model (there a VAE "
                                     "encode is a small part of a step), a bank of 32 on the CPU or under "
                                     "--lowvram. N > 0: N random crops VAE-encoded once before training and reused "
                                     "(saves a VAE encode per step, 40-50% of a CPU step; more = more variety, "
                                     "longer set-up). 0: a fresh random crop every step, VAE-encoded on the fly, as "
                                     "the paper's code."),
                io.Boolean.Input("recon_loss", default=_D.recon_loss, optional=True,
                                 tooltip="Add the official patch configs' reconstruction loss L_rec (weight 1.0): "
                                         "the noise-level-weighted L1 distance between the predicted clean latent "
                                         "and the crop (docs/method.md §2). Off = the denoising loss only."),
            ],
            outputs=[PatchConfigType.Output(display_name="patch_config")],
        )

    @classmethod
    def execute(cls, working_size, train_resolution, min_crop_frac, max_crop_frac, whole_image_prob, grid_size,
                interpolation, grid_gate, crop_bank, recon_loss=_D.recon_loss) -> io.NodeOutput:
        config = PatchConfig(working_size, train_resolution, min_crop_frac, max_crop_frac, whole_image_prob,
                             grid_size, interpolation, grid_gate, crop_bank, recon_loss)
        with node_errors("SINE Patch Resolution Config"):
            try:
                config.validate()
            except ValueError as e:
                raise InputError(None, str(e)) from None
        return io.NodeOutput(config)
