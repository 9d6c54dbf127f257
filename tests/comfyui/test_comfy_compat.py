"""nodes/comfy_compat.py: the pack's own branching for newer ComfyUI, against stand-in objects.

These tests check which branch the pack takes for a capability (a dynamic-VRAM patcher, the in_training flag,
a cast Linear that is not an nn.Linear, a quantized weight class, a link-resolving save check). They do not check
newer ComfyUI's behaviour: the suite runs on 0.3.64 in CI, and on 0.33.0 by hand (docs/compatibility.md), where
the real objects replace these stand-ins; dynamic VRAM needs CUDA and runs in neither.
"""
import os

import pytest
import torch


@pytest.fixture()
def compat(comfy):
    return comfy.pack_module("nodes.comfy_compat")


class DynamicPatcher:
    """Stands in for ModelPatcherDynamic (comfy/model_patcher.py @ e59d85a0): is_dynamic() and clone flags."""

    def __init__(self, can_reload=True):
        self.can_reload, self.calls = can_reload, []

    def is_dynamic(self):
        return True

    def clone(self, disable_dynamic=False, model_override=None, force_deepcopy=False):
        self.calls.append(disable_dynamic)
        if disable_dynamic and not self.can_reload:
            raise RuntimeError("Cannot create non-dynamic delegate: cached_patcher_init is not initialized.")
        return ("non-dynamic clone" if disable_dynamic else "dynamic clone")


def test_training_clone_asks_for_a_non_dynamic_model_only_when_dynamic(compat, comfy, fixtures):
    from comfy import sd
    dynamic = DynamicPatcher()
    assert compat.training_clone(dynamic, "model") == "non-dynamic clone" and dynamic.calls == [True]
    path = comfy.folder_paths.get_full_path_or_raise("checkpoints", fixtures["checkpoint"])
    real = sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)[0]
    # a 0.3.64 ModelPatcher: no is_dynamic, so a plain clone over the same model
    assert not compat.is_dynamic(real)
    clone = compat.training_clone(real, "model")
    assert clone is not real and clone.model is real.model


def test_dynamic_model_that_cannot_be_reloaded_names_the_flag(compat, comfy):
    errors = comfy.pack_module("nodes.errors")
    with pytest.raises(errors.InputError, match="--disable-dynamic-vram") as e:
        compat.training_clone(DynamicPatcher(can_reload=False), "model")
    assert e.value.input_name == "model"


def test_training_mode_sets_and_restores_in_training(compat, monkeypatch):
    import comfy.model_management as mm
    assert not hasattr(mm, "in_training") or mm.in_training is False
    with compat.training_mode():
        pass  # 0.3.64: no flag, nothing to set
    monkeypatch.setattr(mm, "in_training", False, raising=False)  # newer ComfyUI: a module global
    with pytest.raises(KeyError):
        with compat.training_mode():
            assert mm.in_training is True
            raise KeyError("a failing step")
    assert mm.in_training is False


def test_cast_linear_that_is_not_an_nn_linear_is_found(compat):
    import comfy.ops

    class MixedPrecisionLinear(torch.nn.Module, comfy.ops.CastWeightBiasOp):
        """Shaped like newer mixed_precision_ops.Linear (comfy/ops.py @ 5522e4fd)."""
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = 3, 4
            self.weight = torch.nn.Parameter(torch.zeros(4, 3), requires_grad=False)

    assert compat.layer_kind(MixedPrecisionLinear()) == "linear"
    assert compat.layer_kind(comfy.ops.disable_weight_init.Linear(3, 4)) == "linear"
    assert compat.layer_kind(comfy.ops.manual_cast.Conv2d(3, 4, 3)) == "conv2d"
    assert compat.layer_kind(comfy.ops.disable_weight_init.GroupNorm(2, 4)) is None
    assert compat.layer_kind(comfy.ops.manual_cast.Embedding(10, 4)) is None  # a cast op with a 2-D weight


def test_quantized_weights_are_refused_for_training_with_the_checkpoint_type(compat, monkeypatch):
    import sys
    import types

    class QuantizedTensor(torch.Tensor):
        """Stands in for comfy.quant_ops.QuantizedTensor (comfy/quant_ops.py @ cd9452e3)."""

    monkeypatch.setitem(sys.modules, "comfy.quant_ops", types.SimpleNamespace(QuantizedTensor=QuantizedTensor))
    layer = torch.nn.Linear(3, 4)
    compat.refuse_quantized_training([("diffusion_model.a", layer)], "model")  # a plain tensor: accepted
    layer.weight = torch.nn.Parameter(torch.zeros(4, 3).as_subclass(QuantizedTensor), requires_grad=False)
    with pytest.raises(ValueError, match="quantized weights.*QuantizedTensor.*fp16/bf16"):
        compat.refuse_quantized_training([("diffusion_model.a", layer)], "model")


def test_quantized_check_without_quant_ops_is_false(compat):
    assert compat.is_quantized(torch.zeros(2)) is False  # 0.3.64: no comfy.quant_ops module


def test_save_folder_check_follows_comfyuis_link_resolving_rule_when_it_has_one(compat, comfy, tmp_path,
                                                                                monkeypatch):
    """folder_paths.is_within_directory (folder_paths.py @ 4effd056, realpath on both sides) is what newer ComfyUI
    saves by; where it is missing (0.3.64) any folder under the root takes saves."""
    root, elsewhere = tmp_path / "loras", tmp_path / "elsewhere"
    (root / "real").mkdir(parents=True)
    elsewhere.mkdir()
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    monkeypatch.delattr(comfy.folder_paths, "is_within_directory", raising=False)
    compat.check_save_folder(str(root), str(root / "linked"), "filename")  # no such check: accepted

    def within(directory, target):  # the rule newer ComfyUI implements
        return os.path.commonpath((os.path.realpath(directory), os.path.realpath(target))) == \
            os.path.realpath(directory)
    monkeypatch.setattr(comfy.folder_paths, "is_within_directory", within, raising=False)
    compat.check_save_folder(str(root), str(root / "real"), "filename")
    with pytest.raises(ValueError, match="'linked' is a link to a folder outside the loras folder.*"
                                         "extra_model_paths.yaml"):
        compat.check_save_folder(str(root), str(root / "linked"), "filename")

