"""ComfyUI loads the pack, and a stock txt2img workflow runs on the random-weight SD1.5 fixture."""
import numpy as np
from PIL import Image

from workflows_api import txt2img


def test_pack_loads_and_lists_its_nodes(comfy):
    assert comfy.pack_load_ok, "ComfyUI did not import the pack (see the log above for its import error)"
    ids = comfy.node_ids("SINE")
    assert {"SINE_Finetune", "SINE_Guider", "SINE_GuidedSampler", "SINE_AddFinetunedModel", "SINE_PatchResolutionConfig",
            "SINE_SaveAdapter", "SINE_LoadAdapter", "SINE_ApplyAdapter"} <= set(ids), ids
    for node_id in ids:
        info = comfy.object_info(node_id)
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_stock_txt2img_writes_a_png(comfy, fixtures):
    result = comfy.run(txt2img(fixtures["checkpoint"], "a photo of a dog", seed=7, size=256, steps=4))
    images = result.outputs["save"]["images"]
    assert len(images) == 1
    path = comfy.output_path(images[0])
    pixels = np.asarray(Image.open(path)).astype(np.float32)
    assert pixels.shape == (256, 256, 3)
    assert np.isfinite(pixels).all() and pixels.std() > 1.0, "fixture sampling gave a constant image"


def test_fixtures_load_as_sd15_checkpoint_and_controlnet(comfy, fixtures):
    comfy.run({
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures["checkpoint"]}},
        "cnet": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": fixtures["controlnet"]}},
        "show0": {"class_type": "PreviewAny", "inputs": {"source": ["ckpt", 0]}},
        "show1": {"class_type": "PreviewAny", "inputs": {"source": ["cnet", 0]}},
    })
    assert type(comfy.node_output("ckpt", 0).model.model_config).__name__ == "SD15"
    assert type(comfy.node_output("cnet", 0)).__name__ == "ControlNet"
