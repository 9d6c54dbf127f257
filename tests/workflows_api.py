"""API-format workflow builders for tests (the same JSON ComfyUI's "Save (API)" writes)."""


def txt2img(checkpoint: str, prompt: str, *, seed: int, size: int, steps: int, negative: str = "",
            sampler: str = "euler", scheduler: str = "normal", cfg: float = 7.5) -> dict:
    """Checkpoint loader -> text encode x2 -> empty latent -> KSampler -> VAE decode -> save image."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
            "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "sine_test"}},
    }


def finetune_graph(checkpoint: str, image: str, *, prompt: str = "photo of a sks dog", steps: int = 8,
                   lr: float = 1e-3, seed: int = 0, method: str = "lora", rank: int = 4, layers: str = "attention",
                   text_encoder: str = "off", resolution: int = 128, patch: dict | None = None,
                   preset: str = "custom") -> dict:
    """Checkpoint + image -> SINE Finetune (-> loss preview). Node ids: ckpt, image, finetune, loss."""
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "image": {"class_type": "LoadImage", "inputs": {"image": image}},
        "finetune": {"class_type": "SINE_Finetune", "inputs": {
            "model": ["ckpt", 0], "clip": ["ckpt", 1], "vae": ["ckpt", 2], "image": ["image", 0],
            "source_prompt": prompt, "preset": preset, "steps": steps, "learning_rate": lr, "seed": seed,
            "method": method, "lora_rank": rank, "lora_alpha": float(rank), "layers": layers,
            "text_encoder": text_encoder, "precision": "auto", "gradient_checkpointing": False,
            "resize": "stretch", "resolution": resolution}},
        "loss": {"class_type": "PreviewImage", "inputs": {"images": ["finetune", 4]}},
    }
    if patch is not None:
        g["patch"] = {"class_type": "SINE_PatchResolutionConfig", "inputs": patch}
        g["finetune"]["inputs"]["patch_config"] = ["patch", 0]
    return g


def sine_sample_graph(checkpoint: str, adapter_node: dict, *, edit: str, seed: int = 3, steps: int = 4,
                      size: tuple[int, int] = (64, 64), weight: float = 0.3, start: float = 0.0, end: float = 0.6,
                      sampler: str = "euler", scheduler: str = "normal", cfg: float = 7.5, denoise: float = 1.0,
                      stock: bool = False) -> dict:
    """Base checkpoint + a graph fragment providing node 'finetune' -> SINE Guided Sampler (or stock KSampler)."""
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        **adapter_node,
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": edit, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size[0], "height": size[1],
                                                                "batch_size": 1}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "sine"}},
    }
    common = {"model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
              "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
              "denoise": denoise}
    if stock:
        g["sample"] = {"class_type": "KSampler", "inputs": common}
    else:
        g["sample"] = {"class_type": "SINE_GuidedSampler", "inputs": {
            **common, "sine_adapter": ["finetune", 3], "source_conditioning": ["finetune", 2],
            "finetuned_weight": weight, "start_percent": start, "end_percent": end}}
    return g


def load_graph(fixtures, name):
    """Load SINE Adapter `name` -> SINE Apply Adapter on the fixture checkpoint (node ids: ckpt, load, apply)."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures["checkpoint"]}},
        "load": {"class_type": "SINE_LoadAdapter", "inputs": {"adapter_name": name}},
        "apply": {"class_type": "SINE_ApplyAdapter", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                                "sine_adapter": ["load", 0], "positional_grid": True}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["apply", 0]}},
    }
