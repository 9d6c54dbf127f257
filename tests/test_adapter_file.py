"""The adapter file's checks: whole-metadata validation naming the field, non-finite refusal, checksums over tensors
and metadata, atomic no-clobber writes (docs/method.md has no say here: this is the pack's file format)."""
import json
import os

import pytest
import safetensors.torch
import torch

from sine_ops.adapter_file import (AdapterFileError, TEMP_SUFFIX, from_state_dict, load_adapter_file,
                                   metadata, metadata_checksum, non_finite_tensor, save_adapter_file,
                                   state_dict)
from sine_ops.adapters import LoRA
from sine_ops.config import PatchConfig
from sine_ops.sine_adapter import SineAdapter

PATCH = PatchConfig(working_size=1024, train_resolution=512)


def adapter(patch=None, prompt="photo of a sks dog"):
    g = torch.Generator().manual_seed(0)
    lora = LoRA((8, 6), 2, 2.0, generator=g)
    with torch.no_grad():
        lora.up.normal_(generator=g)
    return SineAdapter(unet={"diffusion_model.a.b": lora}, text_encoder={}, family="sd1", source_prompt=prompt,
                       patch=patch, grid_gate=None if patch is None else torch.nn.Parameter(torch.zeros(())))


def file_parts(ad=None):
    ad = ad or adapter(PATCH)
    sd = state_dict(ad)
    return sd, metadata(ad, sd)


def with_info(edit):
    """Metadata whose `sine` entry went through `edit(info)` (in place, or the returned replacement); checksums
    dropped as a hand edit would."""
    sd, meta = file_parts()
    info = json.loads(meta["sine"])
    info = edit(info) or info
    meta = {"sine": json.dumps(info)}
    return sd, meta


def test_round_trip_keeps_everything():
    sd, meta = file_parts()
    back = from_state_dict(sd, meta, require_checksums=True)
    assert back.patch == PATCH and back.source_prompt == "photo of a sks dog" and back.family == "sd1"
    assert torch.equal(state_dict(back)["diffusion_model.a.b.lora_up.weight"], sd["diffusion_model.a.b.lora_up.weight"])


@pytest.mark.parametrize("edit,field", [
    (lambda i: i.pop("family") and None, "'family' is missing"),
    (lambda i: i.pop("source_prompt") and None, "'source_prompt' is missing"),
    (lambda i: i.update(source_prompt=42), "'source_prompt' is 42 (int)"),
    (lambda i: i.update(family=""), "'family'"),
    (lambda i: [i], "is a list"),
    (lambda i: 7, "is a int"),
    (lambda i: i.update(format=2), "'format'"),
    (lambda i: i.update(settings=[1, 2]), "'settings'"),
    (lambda i: i.update(patch="big"), "'patch' is \"big\""),
    (lambda i: i["patch"].update(grid_size=0), "'patch': grid_size must be at least 1"),
    (lambda i: i["patch"].update(grid_size="128"), "'patch.grid_size'"),
    (lambda i: i["patch"].update(interpolation="cubic"), "'patch': interpolation must be one of"),
    (lambda i: i["patch"].update(grid_gate=1), "'patch.grid_gate'"),
    (lambda i: i["patch"].update(min_crop_frac=None), "'patch.min_crop_frac' is missing"),
    (lambda i: i["patch"].update(working_size=0), "'patch': working_size"),
])
def test_damaged_metadata_names_the_field(edit, field):
    sd, meta = with_info(edit)
    with pytest.raises(AdapterFileError) as e:
        from_state_dict(sd, meta)
    assert field in str(e.value)


def test_metadata_that_is_not_json():
    sd, meta = file_parts()
    with pytest.raises(AdapterFileError, match="'sine' is not JSON"):
        from_state_dict(sd, {"sine": "{not json"})


@pytest.mark.parametrize("path", ["diffusion_model.forward", "diffusion_model.a.to", "diffusion_model._modules.a",
                                  "diffusion_model.a.__class__", "text_encoders.state_dict"])
def test_key_naming_a_method_or_private_attribute(path):
    sd, meta = file_parts(adapter())
    sd = {k.replace("diffusion_model.a.b", path): v for k, v in sd.items()}
    with pytest.raises(AdapterFileError, match="does not name a layer"):
        from_state_dict(sd, {"sine": meta["sine"]})


@pytest.mark.parametrize("key,value", [("diffusion_model.a.b.lora_up.weight", float("nan")),
                                       ("diffusion_model.a.b.lora_down.weight", float("inf")),
                                       ("diffusion_model.a.b.alpha", float("nan")),
                                       ("diffusion_model.a.b.alpha", float("inf")),
                                       ("sine.grid_gate", float("-inf"))])
@pytest.mark.parametrize("checksum", ["recomputed", "absent"])
def test_non_finite_tensors_are_refused(key, value, checksum):
    sd, meta = file_parts()
    sd[key] = sd[key].clone().reshape(-1)
    sd[key][0] = value
    sd[key] = sd[key].reshape(file_parts()[0][key].shape)
    meta = metadata(adapter(PATCH), sd) if checksum == "recomputed" else {"sine": meta["sine"]}
    with pytest.raises(AdapterFileError, match="NaN/Inf"):
        from_state_dict(sd, meta)


def test_the_finite_check_reads_back_once_per_device():
    """Over a thousand tensors in a saved SD1.5 LoRA: one read each would be a host sync each on a GPU. The first
    non-finite tensor by name is still the one named."""
    from op_counter import OpCounter
    sd = {f"t{i:03d}": torch.randn(4, 4) for i in range(100)}
    with OpCounter() as c:
        assert non_finite_tensor(sd) is None
    assert sum(c.syncs.values()) == 1, dict(c.sync_ops)
    sd["t050"][1, 1], sd["t007"][0, 0] = float("nan"), float("inf")
    assert non_finite_tensor(sd) == "t007"


def test_non_positive_alpha_is_refused():
    sd, meta = file_parts()
    sd["diffusion_model.a.b.alpha"] = torch.tensor(0.0)
    with pytest.raises(AdapterFileError, match="alpha must be one positive value"):
        from_state_dict(sd, {"sine": meta["sine"]})


def test_metadata_checksum_covers_extra_entries():
    ad = adapter()
    sd = state_dict(ad)
    meta = metadata(ad, sd, {"sine_cache_key": "abc"})
    assert meta["sine_metadata_checksum"] == metadata_checksum(meta)
    forged = {**meta, "sine_cache_key": "def"}
    with pytest.raises(AdapterFileError, match="sine_metadata_checksum"):
        from_state_dict(sd, forged)
    with pytest.raises(AdapterFileError, match="'sine_metadata_checksum' is missing"):
        from_state_dict(sd, {k: v for k, v in meta.items() if k != "sine_metadata_checksum"}, require_checksums=True)


def test_save_refuses_non_finite_weights_and_writes_nothing(tmp_path):
    ad = adapter()
    with torch.no_grad():
        ad.unet["diffusion_model.a.b"].up[0, 0] = float("nan")
    with pytest.raises(AdapterFileError, match="NaN/Inf"):
        save_adapter_file(ad, str(tmp_path / "x.safetensors"))
    assert os.listdir(tmp_path) == []


def test_atomic_write_never_replaces_without_leave_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"user's file")
    with pytest.raises(FileExistsError):
        save_adapter_file(adapter(), str(path), replace=False)
    assert path.read_bytes() == b"user's file" and os.listdir(tmp_path) == ["x.safetensors"]
    save_adapter_file(adapter(), str(path), replace=True)
    assert load_adapter_file(str(path), require_checksums=True)[0].source_prompt == "photo of a sks dog"
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_a_failed_write_leaves_no_file_and_the_temporary_name_is_not_listed(tmp_path, monkeypatch):
    seen = []

    def failing_save(sd, filename, metadata=None):
        seen.append(os.path.basename(filename))
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="No space"):
        save_adapter_file(adapter(), str(tmp_path / "x.safetensors"))
    assert os.listdir(tmp_path) == []
    assert seen and seen[0].endswith(TEMP_SUFFIX) and not seen[0].endswith(".safetensors")


def test_load_names_the_file(tmp_path):
    sd, meta = with_info(lambda i: i.pop("family") and None)
    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(sd, str(path), metadata=meta)
    with pytest.raises(AdapterFileError, match=r"bad\.safetensors: SINE metadata field 'family' is missing"):
        load_adapter_file(str(path))
