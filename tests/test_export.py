"""Export of the online encoder f_θ (safetensors), load_encoder, and embed_folder."""
from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

from byol.config import load_config
from byol.data.decode import decode_image
from byol.data.errors import DataError
from byol.embed import embed_folder, encoder_transform
from byol.eval.commands import load_checkpoint_run
from byol.export import export_encoder, load_encoder, save_encoder
from byol.models.backbones import resnet
from byol.train.pretrain import pretrain
from conftest import TINY, add_bad_files, write_shapes_folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 2-step tiny pretraining run (ResNet-18 1/8 width, CIFAR stem, 16 px)."""
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, [*TINY, "data.dataset=shapes", "data.shapes_size=16", "data.val_fraction=0",
                             "train.max_steps=2", f"train.out_dir={out}", "train.name=r"])
    return pretrain(cfg).run_dir


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "enc.safetensors"
    info = export_encoder(run_dir, path)
    return path, info


def _header(path):
    """The safetensors header, parsed by hand: u64 little-endian length, then JSON."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


def _marker_pickle(marker):
    class Payload:  # unpickling calls open(marker, "w"): the file appears iff code ran
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps(Payload())


def test_exported_encoder_gives_the_checkpoint_online_features(run_dir, exported):
    path, info = exported
    loaded = load_checkpoint_run(run_dir)
    model, ckpt = loaded.model, loaded.checkpoint
    online = model.encoder.eval()
    loaded = load_encoder(path)
    assert isinstance(loaded, type(online)) and not loaded.training
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = online(x), loaded(x)
    assert got.shape == (4, online.feature_dim)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # BN running statistics travelled too (eval mode uses them): they moved from the init
    bn = loaded.bn1.running_mean
    assert torch.equal(bn, online.bn1.running_mean) and bn.abs().sum() > 0
    meta = loaded.byol_meta
    assert meta["backbone"] == "resnet18" and meta["width"] == 0.125 and meta["cifar_stem"] is True
    assert (meta["image_size"], meta["eval_crop_fraction"], meta["step"]) == (16, 1.0, 2)
    assert meta["source_checkpoint"] == str(ckpt) and info["out"] == str(path)
    assert json.loads(path.with_suffix(".json").read_text()) == meta  # sidecar == header


def test_file_is_safetensors_with_exactly_the_encoder_tensors(run_dir, exported):
    path, _ = exported
    header = _header(path)
    model = load_checkpoint_run(run_dir).model
    assert set(header) - {"__metadata__"} == set(model.encoder.state_dict())
    assert not any(k.startswith(("projector", "predictor", "target")) for k in header)
    assert json.loads(header["__metadata__"]["byol_encoder"])["format"] == "byol-encoder"
    assert header["bn1.running_var"]["dtype"] == "F32"


def test_loading_never_executes_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = _marker_pickle(marker)
    pickle.loads(payload)  # the payload is live: plain unpickling runs it
    assert marker.exists()
    marker.unlink()
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(payload)
    pt = tmp_path / "payload.pt"  # a torch.save archive whose pickle runs the payload
    pt.write_bytes(_torch_save_bytes(payload))
    torch.load(pt, weights_only=False)  # live too: an unsafe torch.load runs it
    assert marker.exists()
    marker.unlink()
    zipped = tmp_path / "zipped.safetensors"
    zipped.write_bytes(pt.read_bytes())
    for bad in (raw, zipped):
        with pytest.raises(DataError, match="is not a safetensors file") as e:
            load_encoder(bad)
        assert str(bad) in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def _torch_save_bytes(payload):
    """torch.save's zip archive with ``payload`` as its data.pkl (what a malicious .pt holds)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def test_which_target_exports_the_ema_encoder(run_dir, tmp_path):
    model = load_checkpoint_run(run_dir).model
    info = export_encoder(run_dir, tmp_path / "t.safetensors", which="target")
    loaded = load_encoder(tmp_path / "t.safetensors")
    assert info["which"] == "target"
    for k, v in model.target_encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert not torch.equal(loaded.conv1.weight, model.encoder.conv1.weight)
    with pytest.raises(ValueError, match="which must be 'online' or 'target', got 'both'"):
        export_encoder(run_dir, tmp_path / "u.safetensors", which="both")


def test_refuses_overwrite_unless_forced(run_dir, exported):
    path, _ = exported
    before = path.read_bytes()
    with pytest.raises(DataError, match="already exists") as e:
        export_encoder(run_dir, path)
    assert str(path) in str(e.value) and path.read_bytes() == before
    header = _header(path)
    path.with_suffix(".json").unlink()
    export_encoder(run_dir, path, force=True)
    assert _header(path) == header and path.with_suffix(".json").is_file()
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_load_errors_are_one_line_and_name_the_file(tmp_path, exported):
    path, _ = exported
    cases = {tmp_path / "missing.safetensors": "not found",
             tmp_path / "garbage.safetensors": "is not a safetensors file"}
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 3)
    plain = tmp_path / "plain.safetensors"  # valid safetensors, not ours, no sidecar
    save_file({"w": torch.zeros(2)}, str(plain))
    cases[plain] = "not a byol encoder"
    unknown = tmp_path / "unknown.safetensors"
    meta = json.loads(_header(path)["__metadata__"]["byol_encoder"])
    save_file({"w": torch.zeros(2)}, str(unknown),
              metadata={"byol_encoder": json.dumps({**meta, "backbone": "resnet7"})})
    cases[unknown] = "unknown backbone 'resnet7'"
    wrong = tmp_path / "wrong.safetensors"
    save_file({"w": torch.zeros(2)}, str(wrong), metadata={"byol_encoder": json.dumps(meta)})
    cases[wrong] = "tensors do not match resnet18"
    for bad, needle in cases.items():
        with pytest.raises(DataError, match=needle) as e:
            load_encoder(bad)
        assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_sidecar_is_the_fallback_when_metadata_is_missing(tmp_path, exported):
    path, _ = exported
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(path)), str(bare))  # tensors only, no metadata
    bare.with_suffix(".json").write_text(path.with_suffix(".json").read_text())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(load_encoder(bare)(x), load_encoder(path)(x))


def test_width1_imagenet_stem_export_loads_into_torchvision(tmp_path):
    torch.manual_seed(0)
    encoder = resnet("resnet18").eval()
    path = tmp_path / "r18.safetensors"
    save_encoder(encoder, path, backbone="resnet18")
    tv = torchvision.models.resnet18(num_classes=10).eval()
    result = tv.load_state_dict(load_file(str(path)), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    tv.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tv(x), load_encoder(path)(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="does not match backbone=resnet18 width=0.5"):
        save_encoder(encoder, tmp_path / "x.safetensors", backbone="resnet18", width=0.5)


def test_embed_folder_rows_are_the_encoder_features_in_file_order(tmp_path, exported):
    path, _ = exported
    images = write_shapes_folder(tmp_path / "images", n=10, classes=2, size=20)
    bad = add_bad_files(images)
    late = images / "circle" / "late.jpg"  # passes the quick check, fails to decode
    late.parent.mkdir(exist_ok=True)
    late.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64 + b"\xff\xd9")
    out = tmp_path / "emb" / "emb.npy"
    info = embed_folder(path, images, out, batch_size=4, device="cpu", progress=False)
    emb = np.load(out)
    files = (tmp_path / "emb" / "emb.files.txt").read_text().splitlines()
    good = sorted(p.relative_to(images).as_posix() for p in images.rglob("*.jpg")
                  if p not in bad and p != late)
    assert emb.dtype == np.float32 and emb.shape == (10, 64) and files == good
    assert (info["n"], info["dim"]) == (10, 64)
    assert {s[0] for s in info["skipped"]} == {str(p) for p in [*bad, late]}
    encoder = load_encoder(path)
    tf = encoder_transform(encoder.byol_meta)
    with torch.no_grad():
        ref = torch.cat([encoder(tf(decode_image(images / f))[None]) for f in files])
    np.testing.assert_allclose(emb, ref.numpy(), atol=1e-5, rtol=0)
    labels = json.loads((tmp_path / "emb" / "emb.labels.json").read_text())
    assert [labels["classes"][k] for k in labels["labels"]] == [f.split("/")[0] for f in files]


def test_embed_accepts_a_run_dir_and_an_unlabelled_folder(tmp_path, run_dir, exported):
    path, _ = exported
    images = write_shapes_folder(tmp_path / "images", n=5, classes=1, size=20)
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(images.rglob("*.jpg")):
        p.rename(flat / p.name)
    a = embed_folder(run_dir, flat, tmp_path / "a.npy", device="cpu", progress=False)
    embed_folder(path, flat, tmp_path / "b.npy", device="cpu", progress=False)
    assert a["labels"] is None and not (tmp_path / "a.labels.json").exists()
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"),
                               atol=1e-5, rtol=0)
    with pytest.raises(DataError, match="images folder not found"):
        embed_folder(path, tmp_path / "nope", tmp_path / "c.npy", progress=False)


def test_padding_is_recorded_and_restored(tmp_path):
    """padding="same" (the released weights') round-trips and is format version 2; files without
    the key (written before it existed) are symmetric."""
    from byol.models.backbones import SameConv2d

    torch.manual_seed(0)
    same = resnet("resnet18", width=0.25, padding="same").eval()
    path = tmp_path / "same.safetensors"
    meta = save_encoder(same, path, backbone="resnet18", width=0.25, padding="same", augment_semantics="official")
    assert meta["padding"] == "same" and meta["version"] == 2 and meta["augment_semantics"] == "official"
    loaded = load_encoder(path)
    assert loaded.padding == "same" and isinstance(loaded.conv1, SameConv2d)
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), same(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="pads 'same'"):
        save_encoder(same, tmp_path / "x.safetensors", backbone="resnet18", width=0.25)
    sym = tmp_path / "sym.safetensors"
    assert save_encoder(resnet("resnet18"), sym, backbone="resnet18")["version"] == 1  # readable by older byol
    old = json.loads(_header(sym)["__metadata__"]["byol_encoder"])
    del old["padding"]
    legacy = tmp_path / "legacy.safetensors"
    save_file(load_file(str(sym)), str(legacy), metadata={"byol_encoder": json.dumps(old)})
    assert load_encoder(legacy).padding == "symmetric"
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(sym)), str(bad), metadata={"byol_encoder": json.dumps({**old, "padding": "valid"})})
    with pytest.raises(DataError, match="unknown padding 'valid'"):
        load_encoder(bad)


def test_format_torchvision_of_our_resnet_loads_into_torchvision(tmp_path, run_dir):
    from byol.deploy import save_torchvision
    from byol.export import encoder_meta

    torch.manual_seed(0)
    encoder = resnet("resnet18").eval()
    save_torchvision(encoder, encoder_meta(encoder, backbone="resnet18"), tmp_path / "r18.pth")
    tv = torchvision.models.resnet18().eval()
    result = tv.load_state_dict(torch.load(tmp_path / "r18.pth", weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    tv.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tv(x), encoder(x), atol=1e-5, rtol=0)
    # the tiny run: width 1/8 and a CIFAR stem have no torchvision counterpart
    with pytest.raises(DataError, match=r"torchvision has no resnet18 with width=0.125, cifar_stem=True"):
        export_encoder(run_dir, tmp_path / "tiny.pth", format="torchvision")
    with pytest.raises(DataError, match="--format timm needs a timm backbone"):
        export_encoder(run_dir, tmp_path / "tiny.pth", format="timm")


def test_format_onnx_matches_pytorch_with_a_dynamic_batch(tmp_path, run_dir, capsys):
    import onnxruntime as ort

    from byol.cli import main

    out = tmp_path / "enc.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0
    assert "as onnx" in capsys.readouterr().out
    assert json.loads((tmp_path / "enc.json").read_text())["export_format"] == "onnx"
    session = ort.InferenceSession(str(out))
    enc = load_checkpoint_run(run_dir).model.encoder.eval()
    for n in (1, 3):
        x = torch.randn(n, 3, 16, 16)
        (y,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(y, enc(x).numpy(), atol=1e-4, rtol=1e-4)
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out)]) == 2  # exists: --force
