"""One SINE fine-tuning run on ComfyUI objects (docs/method.md §2, §3): the training image goes into sine_ops as
latents, the adapters train on patched clones, the input MODEL and CLIP are only read.

ComfyUI runs nodes under torch.inference_mode, whose tensors autograd refuses: everything trainable is created
inside inference_mode(False), and inputs made in inference mode are cloned or viewed first. Every call that lets
ComfyUI load, offload or encode goes back into inference mode (comfy_call), so the weights the MODEL, CLIP and VAE
share with every other node are only ever copied the way ComfyUI copies them.
"""
from __future__ import annotations

import copy
import functools
import logging
import time
import types
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

import comfy.model_management
import comfy.utils

from ..sine_ops.adapters import AllRows, RowRouter
from ..sine_ops.config import RECON_LOSS_WEIGHT, FinetuneSettings, OptimConfig, PatchConfig
from ..sine_ops.sine_adapter import SineAdapter
from ..sine_ops.training import (TrainingDiverged, TrainProgress, denoising_loss, noisy_latent, reconstruction_loss,
                                 step_generator, train)
from ..sine_ops.training_data import FreshCropSampler, MaskTooSmall, training_sampler
from . import comfy_compat as compat
from . import model_patching as mp
from . import previews
from .errors import InputError

log = logging.getLogger("sine")
LOG_EVERY, LOG_EVERY_S = 50, 30.0  # a loss line in the console every 50 steps, or every 30 s if that comes first
PREVIEW_EVERY_S: float | None = 2.0  # seconds between live previews on the node (None = no previews)


@dataclass
class TrainingSetup:
    """What the loop needs, prepared once: data, the adapter being trained and the patched clones it runs on."""
    data: object                     # training_data's BankSampler / FreshCropSampler: each step's latent, box, mask
    adapter: SineAdapter
    model: object                    # training clone of the MODEL (ModelPatcher)
    clip: object                     # the CLIP that encodes the prompt (a training clone if the encoder trains)
    tokens: object
    fixed_cond: tuple | None         # the prompt's conditioning when the text encoder is frozen
    device: torch.device
    dtype: torch.dtype | None        # autocast dtype, None = fp32
    views: mp.WeightViews            # the frozen weights' autograd-safe views, released before every load
    router: RowRouter | AllRows      # the training model's: a state per forward (merge groups); AllRows compiled
    compiled: CompiledUNet | None    # the compile setting: the UNet that runs the training forward

    def unet_forward(self):
        """The context of one training forward: the compiled UNet in place, or one routing state per forward
        (all rows trained), in which the layers' merge groups merge once."""
        if self.compiled is not None:
            return self.compiled.active()
        return self.router.route(None, root=self.model.model)


COMPILE_BACKEND = "inductor"  # torch.compile's default (Triton on a GPU, C++ on the CPU)


class CompiledUNet:
    """The compile setting: the training clone's UNet forward compiled with torch.compile, put in place for each
    training forward only (an instance `forward` on the UNet, as ComfyUI's object patches set them) and taken out
    after it, so the UNet the clone shares with the user's MODEL runs its own forward whenever anything else runs.
    The frozen weights' views are installed around the compiled call, so the compiled graph holds none of the
    pack's glue.

    torch.compile keeps what it compiled on the code object its frame starts from, guarded on the run's adapters.
    Compiling the UNet's own forward would pile one entry per run on that shared code until torch's recompile limit
    (8) silently turned compiling off; each run compiles a function with a code object of its own instead, and
    its compiled code goes with the run. (Inductor's on-disk cache still makes a repeated compile quick.)"""

    def __init__(self, unet: torch.nn.Module, views: mp.WeightViews):
        self.unet, self.views = unet, views
        self._patched = unet.__dict__.get("forward")  # a forward another patch set on the UNet itself, if any
        forward = self._patched or functools.partial(type(unet).forward, unet)
        self.compiled = torch.compile(_own_code(lambda *args, **kwargs: forward(*args, **kwargs)),
                                      backend=COMPILE_BACKEND)
        log.info("SINE Finetune: compile is on: the first step compiles the UNet's training step (a minute or more, "
                 "cancel waits for it)")

    @contextmanager
    def active(self):
        with self.views.installed(self.unet):
            self.unet.forward = self.compiled
            try:
                yield
            finally:
                if self._patched is None:
                    del self.unet.forward
                else:
                    self.unet.forward = self._patched


def _own_code(fn):
    """`fn` with a copy of its code object: a function no other run shares."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


Checkpoint = Callable[[SineAdapter], None]


def run_finetune(model, clip, vae, image, source_prompt: str, settings: FinetuneSettings,
                 patch: PatchConfig | None, *, mask: torch.Tensor | None = None, start: SineAdapter | None = None,
                 save_every: int = 0, on_checkpoint: Checkpoint = lambda adapter: None,
                 on_stopped: Checkpoint = lambda adapter: None, compile: bool = False) -> tuple[SineAdapter, list[float]]:
    """Train a SINE adapter on `image` up to `settings.steps` steps in total; returns it (on the CPU, with its
    optimizer state, `settings["steps"]` = steps trained) and the loss of every step.

    start: an adapter of the same layout to continue (its weights, AdamW state and step count). mask: (1, H, W)
    loss weight. on_checkpoint gets a CPU copy every `save_every` steps; on_stopped gets the last completed state
    when training stops early (cancel, error), before the exception goes on. compile: run the UNet's training
    forward (and backward) compiled (CompiledUNet); the result equals the uncompiled run's within float rounding.
    """
    with torch.inference_mode(False):
        generator = torch.Generator().manual_seed(settings.seed)
        setup = _prepare(model, clip, vae, image, source_prompt, settings, patch, generator, mask, compile)
        prior = list(start.losses) if start is not None else []
        progress, start_step = TrainProgress(), 0
        try:
            start_step, optimizer_state = _continue_from(setup.adapter, start)
            _train_loop(setup, settings, progress, start_step, optimizer_state, prior,
                        save_every, lambda: on_checkpoint(_snapshot(setup.adapter, progress, prior, copy_params=True)))
        except BaseException:
            if progress.step > start_step:
                _keep_stopped(on_stopped, _snapshot(setup.adapter, progress, prior, copy_params=True))
            raise
        finally:
            setup.adapter.requires_grad_(False)
            setup.views.release()
            setup.model = setup.clip = setup.compiled = None
            comfy_call(comfy.model_management.cleanup_models_gc)
            comfy_call(comfy.model_management.soft_empty_cache)
        adapter = _snapshot(setup.adapter, progress, prior, copy_params=False)
        return adapter, adapter.losses


def comfy_call(fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, a ComfyUI call that may load, offload or encode, run in inference mode as ComfyUI's
    executor runs nodes; tensors in its result come back as normal tensors.

    Training runs outside inference mode. A GPU load or offload made there copies the shared weights into normal
    tensors inside inference Parameters, and every later view of them fails, in stock nodes too ("Inference
    tensors do not track version counter"; sine_ops/tensor_views.py). Inside inference mode the copies are what
    ComfyUI itself makes."""
    with torch.inference_mode():
        result = fn(*args, **kwargs)
    return _normal_tensors(result)


def _normal_tensors(value):
    if torch.is_tensor(value):
        return value.clone() if value.is_inference() else value  # a clone made here is a normal tensor
    if isinstance(value, (list, tuple)):
        return type(value)(_normal_tensors(v) for v in value)
    if isinstance(value, dict):
        return {k: _normal_tensors(v) for k, v in value.items()}
    return value


def _keep_stopped(on_stopped: Checkpoint, adapter: SineAdapter) -> None:
    """Hand the stopped run's state over; a failure here is logged, never put in place of the real error."""
    try:
        on_stopped(adapter)
    except Exception as e:  # noqa: BLE001 - the training's own exception is the one to report
        log.warning(f"SINE Finetune: could not keep the stopped run's state ({type(e).__name__}: {e})")


# Settings that change what trained weights mean: continuing under other values would silently rescale or
# misplace what was learned (lora_alpha scales the LoRA update; the patch layout places the positional grid).
MEANING_SETTINGS = ("method", "layers", "text_encoder")
LORA_SETTINGS = ("lora_rank", "lora_alpha")
PATCH_LAYOUT = ("working_size", "train_resolution", "grid_size", "interpolation", "grid_gate")


def _continue_from(adapter: SineAdapter, start: SineAdapter | None):
    """(first step, optimizer state in parameter order or None): copies `start`'s weights into the fresh
    `adapter` after checking it was trained with the same meaning-changing settings and layout."""
    if start is None:
        return 0, None
    differing = _differing_settings(start, adapter)
    if differing:
        raise InputError("continue_from", "this adapter was trained with other settings, which change what its "
                                          f"weights mean: {'; '.join(differing)}. Set them as it was trained, or "
                                          "disconnect continue_from")
    ours, theirs = dict(adapter.named_parameters()), dict(start.named_parameters())
    trained = start.settings.get("steps")
    if set(ours) != set(theirs) or any(ours[k].shape != theirs[k].shape for k in ours):
        raise InputError("continue_from", "this adapter was trained with another layout (method, lora_rank, "
                                          "layers, text_encoder, grid_gate or patch mode); set those inputs as it "
                                          f"was trained: {_layout_text(start.settings)}")
    if not isinstance(trained, int) or trained < 1:
        raise InputError("continue_from", "this adapter does not record how many steps it was trained; it cannot "
                                          "be continued")
    with torch.no_grad():
        for name, p in ours.items():
            p.copy_(theirs[name].to(p))
    state = start.optimizer_state
    if state is None:
        log.warning("SINE Finetune: continue_from has no optimizer state (saved without it); AdamW restarts "
                    "from zero, so the result differs from one uninterrupted run")
        return trained, None
    return trained, [_checked_optimizer_state(name, p, state.get(name, {})) for name, p in ours.items()]


def _layout_text(settings: dict) -> str:
    return ", ".join(f"{k}={settings.get(k)}" for k in ("method", "lora_rank", "layers", "text_encoder"))


def _differing_settings(start: SineAdapter, adapter: SineAdapter) -> list[str]:
    """'<setting> <as trained> (this run: <now>)' for each meaning-changing setting that differs. A file trained by
    SINE Finetune (it records `method`) that lacks one of them differs in it: what its weights mean is unknown.
    Files without a method (an imported LoRA) are compared by layer shapes only."""
    was, now = start.settings, adapter.settings
    names = () if "method" not in was else \
        MEANING_SETTINGS + (LORA_SETTINGS if now.get("method") == "lora" == was.get("method") else ())
    differing = [f"{k} {was.get(k, 'not recorded')!r} (this run: {now.get(k)!r})"
                 for k in names if k not in was or was[k] != now.get(k)]
    if (start.patch is None) != (adapter.patch is None):
        differing.append(f"patch_config {'connected' if start.patch is not None else 'not connected'} (this run: "
                         f"{'connected' if adapter.patch is not None else 'not connected'})")
    elif start.patch is not None:
        differing += [f"patch {k} {getattr(start.patch, k)!r} (this run: {getattr(adapter.patch, k)!r})"
                      for k in PATCH_LAYOUT if getattr(start.patch, k) != getattr(adapter.patch, k)]
    return differing


def _checked_optimizer_state(name: str, param: torch.Tensor, state: dict) -> dict:
    """The AdamW state of one parameter as the optimizer takes it, or InputError naming what is malformed."""
    if not state:
        return {}
    missing = [f for f in ("step", "exp_avg", "exp_avg_sq") if f not in state]
    bad = [f for f in ("exp_avg", "exp_avg_sq") if f in state and tuple(state[f].shape) != tuple(param.shape)]
    if missing or bad or state["step"].numel() != 1:
        what = f"missing {', '.join(missing)}" if missing else \
            f"{', '.join(bad) or 'step'} of the wrong shape" + (f" ({tuple(state[bad[0]].shape)}, the parameter "
                                                                 f"is {tuple(param.shape)})" if bad else "")
        raise InputError("continue_from", f"its optimizer state for {name} is malformed ({what}); the file is "
                                          "damaged. Continue from another adapter, or train from zero")
    return state


def _snapshot(adapter: SineAdapter, progress: TrainProgress, prior: list[float], copy_params: bool) -> SineAdapter:
    """The adapter at `progress.step`, on the CPU, with its optimizer state and loss history. copy_params: a
    copy (training goes on), else the trained parameters are moved to the CPU in place."""
    names = [name for name, _ in adapter.named_parameters()]
    losses = prior + list(progress.read_losses(strict=False))  # first: a divergence found here sets the step
    state = None if progress.optimizer_state is None else \
        {n: s for n, s in zip(names, progress.optimizer_state) if s}
    result = replace(adapter, settings={**adapter.settings, "steps": progress.step}, optimizer_state=state,
                     losses=losses)
    if not copy_params:
        for p in result.parameters():
            p.data = p.data.cpu()
        return result
    memo = {id(p): torch.nn.Parameter(p.detach().cpu().clone(), requires_grad=False) for p in adapter.parameters()}
    memo.update({id(v): v for v in (state, result.losses, result.settings)})  # already fresh: not copied again
    return copy.deepcopy(result, memo)


def _prepare(model, clip, vae, image, source_prompt, settings, patch, generator, mask=None,
             compile: bool = False) -> TrainingSetup:
    family = mp.model_family(model)
    if patch is not None:
        if not mp.has_unet_input_conv(model):
            raise InputError("patch_config", f"patch-based fine-tuning needs a UNet with an input conv (SD1.x/"
                                             f"SD2.x/SDXL); this model is {family}. Disconnect patch_config.")
        try:
            patch = patch.resolved(family)
        except ValueError as e:
            raise InputError("patch_config", f"{e} (set in SINE Patch Resolution Config)") from None
    with torch.no_grad(), _mask_errors():
        data = training_sampler(image.clone(), lambda px: comfy_call(_encoded_latent, model, vae, px), settings,
                                family, patch, generator, None if mask is None else mask.clone(),
                                on_item=_interruptible)
        tokens = clip.tokenize(source_prompt)
        fixed_cond = None if settings.text_encoder != "off" else \
            comfy_call(lambda: clip.encode_from_tokens_scheduled(tokens)[0])
    train_base = compat.training_clone(model, "model")  # a non-dynamic model under newer ComfyUI's dynamic VRAM
    adapter = _new_adapter(train_base, clip, family, source_prompt, settings, patch, generator)
    router = AllRows() if compile else RowRouter()  # no row routing: every row is the fine-tuned model in training
    train_model = mp.patched_model(train_base, {0: adapter}, router)
    views = mp.WeightViews()
    compiled = CompiledUNet(train_model.model.diffusion_model, views) if compile else None
    if compiled is None:
        mp.attach_trainable_weights(train_model, views, "diffusion_model.")
    if settings.gradient_checkpointing:
        mp.attach_gradient_checkpointing(train_model)
    train_clip = mp.patched_clip(compat.training_clip_clone(clip) if adapter.text_encoder else clip, adapter)
    if adapter.text_encoder:
        mp.attach_inplace_guards(train_clip.patcher)
        mp.attach_trainable_weights(train_clip.patcher, views)
        # its encode trains, outside inference mode, but the load inside the encode must run as ComfyUI's do: on a
        # small GPU it frees memory by offloading other models (the shared VAE), copies no later node could read
        train_clip.load_model = functools.partial(comfy_call, train_clip.load_model)
    device = mp.device_of(model)
    return TrainingSetup(data, adapter, train_model, train_clip, tokens, fixed_cond, device,
                         _compute_dtype(settings.precision, device), views, router, compiled)


def _interruptible(done: int, total: int) -> None:
    """After each set-up encode (the crop bank: up to minutes): ComfyUI's cancel, and the set-up's progress."""
    comfy.model_management.throw_exception_if_processing_interrupted()
    comfy.utils.ProgressBar(total).update_absolute(done, total)


def _encoded_latent(model, vae, pixels: torch.Tensor) -> torch.Tensor:
    return model.model.process_latent_in(vae.encode(pixels).float().cpu())


def _new_adapter(model, clip, family, source_prompt, settings: FinetuneSettings, patch, generator) -> SineAdapter:
    """Fresh adapters for the chosen layers (LoRA up = 0 / zero deltas: the fine-tuned model starts at the base)."""
    unet_layers = mp.unet_layers(model, settings.layers)
    if settings.method == "lora":
        largest = max(mp.max_lora_rank(m) for _, m in unet_layers)
        if settings.lora_rank > largest:
            raise InputError("lora_rank", f"{settings.lora_rank} is larger than every chosen layer allows (at most "
                                          f"{largest} for layers '{settings.layers}'); use 4-64")

    def group(layers, method):
        return {p: mp.new_adapter(m, method, settings.lora_rank, settings.lora_alpha, generator) for p, m in layers}

    unet = group(unet_layers, settings.method)
    text_encoder = {} if settings.text_encoder == "off" else \
        group(mp.text_encoder_layers(clip, settings.text_encoder), settings.text_encoder)
    return SineAdapter(unet=unet, text_encoder=text_encoder, family=family, source_prompt=source_prompt,
                       patch=patch, settings=asdict(settings),
                       grid_gate=torch.nn.Parameter(torch.zeros(())) if patch is not None and patch.grid_gate else None)


def _compute_dtype(precision: str, device: torch.device):
    if device.type == "cpu" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if comfy.model_management.should_use_bf16(device) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _train_loop(s: TrainingSetup, settings: FinetuneSettings, progress: TrainProgress, start_step: int,
                optimizer_state, prior_losses: list[float], save_every: int, checkpoint: Callable[[], None]) -> None:
    ms = s.model.model.model_sampling
    _load(s, s.model)
    transformer_options = s.model.model_options["transformer_options"]
    recon = s.adapter.patch is not None and s.adapter.patch.recon_loss
    grids = mp.PositionalGrids()  # patch mode: each step's crop window of the grid, made before the forward
    grid_channels = s.model.model.diffusion_model.model_channels  # the feature map the grid is added to
    last = {}  # the latest step's denoised prediction, for the live preview
    frozen_inputs = {}  # latent shape -> the frozen prompt's model inputs, made and moved to the device once

    def prompt_inputs(x: torch.Tensor) -> dict:
        if s.fixed_cond is None:  # the text encoder trains: encode the prompt at every step
            return mp.model_kwargs(s.model, _encode_trained_prompt(s), x, s.device)
        key = (tuple(x.shape), x.dtype)
        if key not in frozen_inputs:
            frozen_inputs[key] = mp.model_kwargs(s.model, s.fixed_cond, x, s.device)
        return frozen_inputs[key]

    def loss_at_step(step: int) -> torch.Tensor:
        generator = step_generator(settings.seed, step)  # step k draws the same whatever step the run started at
        fresh_crop = isinstance(s.data, FreshCropSampler)
        if fresh_crop:  # its VAE encode may move the UNet off a small GPU: let go of views of where it was
            s.views.release()
        latent, box, mask = s.data.draw(generator)
        if fresh_crop:
            _load(s, s.model)
        x0, mask = latent.to(s.device), None if mask is None else mask.to(s.device)
        sigma, _, x = noisy_latent(ms, x0, generator)
        # a copy per step: ComfyUI's forward adds keys to the dict it is given, and a compiled step would be
        # compiled again for a dict that grew
        options = dict(transformer_options)
        if box is not None and s.adapter.grid_enabled:
            options[mp.CROP_GRID_KEY] = grids.windows(s.adapter, box, grid_channels, tuple(x.shape[-2:]), s.device)
        with torch.autocast(s.device.type, dtype=s.dtype, enabled=s.dtype is not None), s.unet_forward():
            denoised = s.model.model.apply_model(x, sigma, transformer_options=options, **prompt_inputs(x))
        last["denoised"] = denoised.detach()
        loss = denoising_loss(ms, sigma, denoised, x0, mask)
        if recon:
            loss = loss + RECON_LOSS_WEIGHT * reconstruction_loss(ms, sigma, denoised, x0, mask)
        return loss

    on_step = _step_reporter(s, settings.steps, prior_losses, progress, last)
    for p in s.adapter.parameters():
        p.data = p.data.to(s.device)
        p.requires_grad_(True)
    config = OptimConfig(steps=settings.steps, learning_rate=settings.learning_rate,
                         clip_grad_norm=settings.clip_grad_norm, checkpoint_every=save_every)
    try:
        with torch.enable_grad(), compat.training_mode(), _mask_errors():
            train(s.adapter.parameters(), loss_at_step, config, on_step, start_step=start_step,
                  optimizer_state=optimizer_state, progress=progress, on_checkpoint=lambda _: checkpoint())
    except TrainingDiverged as e:
        raise InputError("learning_rate", str(e)) from None
    except _compile_errors(s) as e:
        cause = getattr(e, "inner_exception", None) or e  # what the compiler itself raised
        reason = (str(cause).strip().splitlines() or [""])[0][:300]
        raise InputError("compile", f"torch.compile failed on this machine ({type(cause).__name__}: {reason}); "
                                    "set compile to false") from e
    finally:
        if s.data.missed_crops:
            log.info(f"SINE Finetune: {s.data.missed_crops} crops missed the mask's white area and were drawn "
                     "again")


def _compile_errors(s: TrainingSetup) -> tuple:
    """What torch.compile raises when it cannot compile (no Triton, no C++ compiler, an unsupported op): for a
    compiled run only, looked up only when an exception is on its way."""
    if s.compiled is None:
        return ()
    from torch._dynamo.exc import TorchDynamoException  # the base of BackendCompilerFailed and InductorError
    return (TorchDynamoException,)


@contextmanager
def _mask_errors():
    try:
        yield
    except MaskTooSmall as e:
        raise InputError("mask", str(e)) from None


def _step_reporter(s: TrainingSetup, total: int, prior_losses: list[float], progress: TrainProgress, last: dict):
    """on_step for train(): cancel, the progress bar with a live preview every PREVIEW_EVERY_S seconds (first
    and last step included; none where ComfyUI's preview setting shows none: previews.latent_decoder), and a
    console loss line every LOG_EVERY steps or LOG_EVERY_S seconds."""
    pbar = comfy.utils.ProgressBar(total)
    decode = previews.latent_decoder(s.model)
    clock = {"preview": None, "log": time.monotonic(), "logged_step": progress.step}

    def on_step(step: int, loss: torch.Tensor) -> None:  # loss: read back only when a line is logged
        comfy.model_management.throw_exception_if_processing_interrupted()
        now = time.monotonic()
        preview = None
        if decode is not None and PREVIEW_EVERY_S is not None and \
                (clock["preview"] is None or step == total or now - clock["preview"] >= PREVIEW_EVERY_S):
            preview = previews.training_preview(prior_losses + progress.losses, comfy_call(decode, last["denoised"]))
            clock["preview"] = now
        pbar.update_absolute(step, total, preview)
        if step % LOG_EVERY == 0 or step == total or now - clock["log"] >= LOG_EVERY_S:
            recent = progress.losses[-(step - clock["logged_step"]):]
            rate = (step - clock["logged_step"]) / max(now - clock["log"], 1e-9)
            log.info(f"SINE Finetune: step {step}/{total} loss {recent[-1]:.5f} (mean of the last {len(recent)}: "
                     f"{sum(recent) / len(recent):.5f}), {rate:.2f} steps/s")
            clock["log"], clock["logged_step"] = now, step

    return on_step


def _load(s: TrainingSetup, patcher) -> None:
    """Load a training clone the way ComfyUI loads models (a no-op when it is loaded), after letting go of the views
    of weights the load may move."""
    s.views.release()
    comfy_call(comfy.model_management.load_models_gpu, [patcher], force_full_load=True)


def _encode_trained_prompt(s: TrainingSetup) -> tuple:
    # The encode itself runs with gradients, outside inference mode; the text encoder is loaded before it, and the
    # load inside it runs in inference mode (set up in _prepare: train_clip.load_model).
    _load(s, s.clip.patcher)
    cond_entry = s.clip.encode_from_tokens_scheduled(s.tokens)[0]
    # loading the text encoder may have evicted the UNet on a small GPU (a no-op otherwise)
    _load(s, s.model)
    return cond_entry
