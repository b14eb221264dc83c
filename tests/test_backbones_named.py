"""Named backbones (model.backbone=torchvision/NAME | timm/NAME), model.init, and the deployment
export formats: real training through the CLI, bitwise resume, export/load, LARS exclusions."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from byol.cli import main
from byol.config import ConfigError, load_config
from byol.data.errors import DataError
from byol.eval.commands import load_checkpoint_run
from byol.export import export_encoder, load_encoder
from byol.models.build import build_model
from byol.models.named import named_backbone
from byol.optim import excluded_from_decay_and_adaptation
from byol.optim.lars import TOKEN_PARAMS
from byol.train.checkpoint import find_checkpoint, load_checkpoint
from byol.train.pretrain import pretrain
from byol.train.setup import build_model_and_optimizer
from conftest import TINY, write_shapes_folder

# TINY without the options of our ResNets; 24 shapes at 32 px, batch 8: 3 steps per epoch
BASE = [a for a in TINY if not a.startswith(("model.backbone", "model.width", "model.cifar_stem"))]
DATA = ["augment.size=32", "data.dataset=shapes", "data.shapes_size=24", "data.val_fraction=0",
        "train.checkpoint_every=100", "eval.final_knn=false"]
FAMILIES = ["timm/test_vit", "timm/test_convnext", "torchvision/mobilenet_v3_small"]


def _cfg(tmp_path, backbone, name, *extra):
    return load_config(None, [*BASE, *DATA, f"model.backbone={backbone}", f"train.out_dir={tmp_path}",
                              f"train.name={name}", *extra])


def _expect_error(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


@pytest.mark.parametrize("backbone", FAMILIES)
def test_named_backbone_trains_resumes_bitwise_and_exports(tmp_path, backbone):
    """ViT (32 px: 4 patches of 16), ConvNeXt, MobileNetV3: the real CLI for 6 steps; 3 + resume
    + 3 equals it bitwise; the export loads back to the checkpoint's encoder outputs."""
    config = tmp_path / "c.yaml"
    config.write_text("train: {}\n")
    argv = ["pretrain", "--config", str(config), *BASE, *DATA, f"model.backbone={backbone}", "optim.epochs=2",
            f"train.out_dir={tmp_path}"]
    assert main([*argv, "train.name=full"]) == 0
    assert main([*argv, "train.name=split", "train.max_steps=3"]) == 0
    assert main(["pretrain", "--resume", str(tmp_path / "split")]) == 0
    a = load_checkpoint(find_checkpoint(tmp_path / "full"))
    b = load_checkpoint(find_checkpoint(tmp_path / "split"))
    assert a["step"] == b["step"] == 6 and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert any(k.startswith("target_encoder.") for k in a["model"])

    out = tmp_path / "enc.safetensors"
    assert main(["export", str(tmp_path / "full"), "--out", str(out)]) == 0
    enc = load_encoder(out)
    assert enc.byol_meta["backbone"] == backbone and enc.byol_meta["image_size"] == 32
    run = load_checkpoint_run(tmp_path / "full")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y = enc(x)
        assert y.shape == (3, enc.feature_dim)
        assert torch.equal(y, run.model.encoder.eval()(x))


def test_eval_and_embed_work_on_a_named_backbone_run(tmp_path, capsys):
    data = write_shapes_folder(tmp_path / "imgs", n=12, classes=3, size=32)
    run = pretrain(_cfg(tmp_path, "timm/test_convnext", "r", "train.max_steps=2")).run_dir
    assert main(["eval", "knn", str(run), "--train", str(data), "--test", str(data), "--k", "3"]) == 0
    assert "top-1" in capsys.readouterr().out
    out = tmp_path / "e.safetensors"
    export_encoder(run, out)
    assert main(["embed", str(out), str(data), "--out", str(tmp_path / "emb.npy"), "--no-progress"]) == 0
    assert np.load(tmp_path / "emb.npy").shape == (12, 64)
    assert main(["eval", "knn", str(out), "--train", str(data), "--test", str(data), "--k", "3"]) == 0


def test_timm_and_torchvision_formats_load_into_the_libraries(tmp_path):
    import timm

    vit = pretrain(_cfg(tmp_path, "timm/test_vit", "vit", "train.max_steps=1")).run_dir
    export_encoder(vit, tmp_path / "vit.safetensors", format="timm")
    net = timm.create_model("test_vit", num_classes=0, img_size=32,
                            pretrained_cfg_overlay={"file": str(tmp_path / "vit.safetensors")}, pretrained=True)
    mob = pretrain(_cfg(tmp_path, "torchvision/mobilenet_v3_small", "mob", "train.max_steps=1")).run_dir
    export_encoder(mob, tmp_path / "mob.pth", format="torchvision")
    tv = torchvision.models.mobilenet_v3_small()
    result = tv.load_state_dict(torch.load(tmp_path / "mob.pth", weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["classifier.3.bias", "classifier.3.weight"]
    assert not result.unexpected_keys
    tv.classifier[3] = torch.nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), load_checkpoint_run(vit).model.encoder.eval()(x))
        torch.testing.assert_close(tv.eval()(x), load_checkpoint_run(mob).model.encoder.eval()(x))
    with pytest.raises(DataError, match="--format timm needs a timm backbone"):
        export_encoder(mob, tmp_path / "x.pth", format="timm")
    with pytest.raises(DataError, match="--format torchvision needs a torchvision backbone"):
        export_encoder(vit, tmp_path / "x.pth", format="torchvision")


def test_onnx_export_matches_pytorch_with_a_dynamic_batch(tmp_path):
    import onnxruntime as ort

    run = pretrain(_cfg(tmp_path, "timm/test_vit", "vit", "train.max_steps=1")).run_dir
    info = export_encoder(run, tmp_path / "vit.onnx", format="onnx")
    assert info["export_format"] == "onnx" and (tmp_path / "vit.json").is_file()
    session = ort.InferenceSession(str(tmp_path / "vit.onnx"))
    enc = load_checkpoint_run(run).model.encoder.eval()
    for n in (1, 5):
        x = torch.randn(n, 3, 32, 32)
        (y,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(y, enc(x).numpy(), atol=1e-4, rtol=1e-4)


# -- LARS / weight decay exclusions, per family -----------------------------------------------------

def _excluded(net):
    ex = excluded_from_decay_and_adaptation(net)
    kept = {n for n, _ in net.named_parameters()} - ex
    return ex, kept


def test_exclusions_per_family():
    """Norms (BN, BatchNormAct2d, LayerNorm, LayerNorm2d, GroupNorm), biases, other 1-D params
    and ViT tokens/position embeddings are excluded; every conv/linear weight (>= 2-D) is kept."""
    for backbone in ("timm/test_vit", "timm/test_convnext", "timm/mobilenetv3_small_050", "timm/test_efficientnet_gn",
                     "torchvision/vit_b_16", "torchvision/swin_t", "torchvision/convnext_tiny",
                     "torchvision/mobilenet_v3_small", "torchvision/regnet_y_400mf"):
        net = named_backbone(backbone, image_size=32)
        ex, kept = _excluded(net)
        params = dict(net.named_parameters())
        assert all(params[n].dim() >= 2 for n in kept), backbone
        assert all(p.dim() <= 1 for n, p in params.items() if n.rpartition(".")[2] != "weight"
                   and n not in kept and n.rpartition(".")[2] not in TOKEN_PARAMS), backbone
        assert all(params[n].dim() <= 1 or n.rpartition(".")[2] in TOKEN_PARAMS for n in ex), backbone
        assert all(n in ex for n, p in params.items() if p.dim() <= 1), backbone
        norms = [m for m in net.modules() if isinstance(m, (torch.nn.modules.batchnorm._NormBase,
                                                            torch.nn.LayerNorm, torch.nn.GroupNorm))]
        assert norms, backbone
        for m in norms:
            assert all(id(p) in {id(params[n]) for n in ex} for p in m.parameters(recurse=False)), backbone
    ex, _ = _excluded(named_backbone("timm/test_vit", image_size=32))
    assert {"cls_token", "pos_embed"} <= ex and "blocks.0.attn.qkv.weight" not in ex
    ex, _ = _excluded(named_backbone("torchvision/vit_b_16", image_size=32))
    assert {"class_token", "encoder.pos_embedding"} <= ex
    ex, _ = _excluded(named_backbone("torchvision/swin_t", image_size=32))
    assert "features.1.0.attn.relative_position_bias_table" in ex
    ex, _ = _excluded(named_backbone("timm/test_convnext", image_size=32))
    assert any(n.endswith("gamma") for n in ex) or any(n.endswith(".norm.weight") for n in ex)


def test_memory_format_per_family(tmp_path):
    vit, _ = build_model_and_optimizer(_cfg(tmp_path, "timm/test_vit", "a"), torch.device("cpu"))
    conv, _ = build_model_and_optimizer(_cfg(tmp_path, "timm/test_convnext", "b"), torch.device("cpu"))
    w_vit = vit.encoder.patch_embed.proj.weight
    w_conv = conv.encoder.stem[0].weight
    assert w_vit.is_contiguous() and not w_vit.is_contiguous(memory_format=torch.channels_last)
    assert w_conv.is_contiguous(memory_format=torch.channels_last)


# -- config errors ----------------------------------------------------------------------------------

def test_config_errors_are_one_line(tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match=r"model.backbone: unknown torchvision model 'resnet51' \(close: .*resnet50"):
        load_config(None, ["model.backbone=torchvision/resnet51"])
    with pytest.raises(ConfigError, match="model.width must be 1.0 with model.backbone=timm/test_vit"):
        load_config(None, ["model.backbone=timm/test_vit", "model.width=0.5"])
    with pytest.raises(ConfigError, match="model.cifar_stem"):
        load_config(None, ["model.backbone=torchvision/resnet18", "model.cifar_stem=true"])
    with pytest.raises(ConfigError, match="model.backbone must be one of resnet18"):
        load_config(None, ["model.backbone=resnet51"])
    with pytest.raises(ConfigError, match="model.init"):
        load_config(None, ["model.backbone=resnet18", "model.init=pretrained"])
    config = tmp_path / "c.yaml"
    config.write_text("train: {}\n")
    argv = ["pretrain", "--config", str(config), *BASE, *DATA, f"train.out_dir={tmp_path}"]
    _expect_error(capsys, [*argv, "model.backbone=timm/convnxt_atto"], "unknown timm model 'convnxt_atto'",
                  "convnext_atto")
    monkeypatch.setitem(sys.modules, "timm", None)  # timm not installed
    _expect_error(capsys, [*argv, "model.backbone=timm/test_vit"], "pip install 'byol[timm]'")


def test_loading_a_timm_export_without_timm_is_one_line(tmp_path, monkeypatch):
    run = pretrain(_cfg(tmp_path, "timm/test_convnext", "r", "train.max_steps=1")).run_dir
    export_encoder(run, tmp_path / "e.safetensors")
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(DataError, match=r"timm/test_convnext needs timm: .*pip install 'byol\[timm\]'"):
        load_encoder(tmp_path / "e.safetensors")


# -- model.init ----------------------------------------------------------------------------------

def test_init_path_loads_into_online_and_target_encoders(tmp_path, capsys):
    torch.manual_seed(1)
    src = named_backbone("torchvision/mobilenet_v3_small", image_size=32)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    wrapped = {"state_dict": {**sd, "classifier.3.weight": torch.zeros(10, 1024),
                              "classifier.3.bias": torch.zeros(10)}}  # a classifier head, dropped
    torch.save(wrapped, tmp_path / "init.pth")
    save_file(sd, str(tmp_path / "init.safetensors"))
    for path in ("init.pth", "init.safetensors"):
        cfg = _cfg(tmp_path, "torchvision/mobilenet_v3_small", "i", f"model.init={tmp_path / path}")
        model, _ = build_model_and_optimizer(cfg, torch.device("cpu"))
        for enc in (model.encoder, model.target_encoder):
            for k, v in enc.state_dict().items():
                assert torch.equal(v, sd[k]), (path, k)
    # our ResNets: a checkpoint-style {"model": {"encoder.*": ...}} file works too
    torch.manual_seed(2)
    cfg = load_config(None, [*TINY, "model.init=" + str(tmp_path / "ckpt.pt")])
    ref = build_model(cfg)
    torch.save({"model": ref.state_dict()}, tmp_path / "ckpt.pt")
    model, _ = build_model_and_optimizer(cfg, torch.device("cpu"))
    for k, v in ref.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v) and torch.equal(model.target_encoder.state_dict()[k], v)

    bad = {k: v for k, v in sd.items() if not k.startswith("features.0.")}
    bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pt")
    shape = {**sd, "features.0.0.weight": torch.zeros(1, 1, 1, 1)}
    torch.save(shape, tmp_path / "shape.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    config = tmp_path / "c.yaml"
    config.write_text("train: {}\n")
    argv = ["pretrain", "--config", str(config), *BASE, *DATA, "model.backbone=torchvision/mobilenet_v3_small",
            f"train.out_dir={tmp_path}"]
    _expect_error(capsys, [*argv, f"model.init={tmp_path / 'bad.pt'}"], "missing, e.g. features.0.0.weight",
                  "unexpected, e.g. extra.weight")
    _expect_error(capsys, [*argv, f"model.init={tmp_path / 'shape.pt'}"], "features.0.0.weight has shape (1, 1, 1, 1)",
                  "(16, 3, 3, 3)")
    _expect_error(capsys, [*argv, f"model.init={tmp_path / 'junk.pt'}"], "junk.pt")
    _expect_error(capsys, [*argv, f"model.init={tmp_path / 'none.pt'}"], "model.init: file not found")


def test_init_pretrained_reads_the_cache_and_fails_offline_in_one_line(tmp_path, capsys, monkeypatch):
    """torchvision's weights API reads TORCH_HOME/hub/checkpoints before downloading: a file saved
    there is what model.init=pretrained loads; without it (no network) the error is one line."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        import urllib.error

        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    config = tmp_path / "c.yaml"
    config.write_text("train: {}\n")
    argv = ["pretrain", "--config", str(config), *BASE, *DATA, "model.backbone=torchvision/mobilenet_v3_small",
            "model.init=pretrained", f"train.out_dir={tmp_path}"]
    _expect_error(capsys, argv, "model.init=pretrained: could not download the weights of "
                                "torchvision/mobilenet_v3_small")

    weights = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT
    torch.manual_seed(3)
    full = torchvision.models.mobilenet_v3_small()
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(full.state_dict(), cache / weights.url.rsplit("/", 1)[1])
    cfg = _cfg(tmp_path, "torchvision/mobilenet_v3_small", "p", "model.init=pretrained")
    model, _ = build_model_and_optimizer(cfg, torch.device("cpu"))
    for enc in (model.encoder, model.target_encoder):
        for k, v in enc.state_dict().items():
            assert torch.equal(v, full.state_dict()[k]), k


def test_timm_pretrained_offline_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    cfg = _cfg(tmp_path, "timm/test_vit", "p", "model.init=pretrained")
    with pytest.raises(ValueError, match="model.init=pretrained: could not download the weights of timm/test_vit") as e:
        build_model_and_optimizer(cfg, torch.device("cpu"))
    assert "\n" not in str(e.value)


def test_a_resume_does_not_read_model_init_again(tmp_path):
    """The init file seeds the first session only: the checkpoint holds the weights afterwards, so a
    resume works (and is the same run) after the file is gone."""
    from byol.train.checkpoint import find_checkpoint, load_checkpoint
    from byol.train.pretrain import pretrain

    init = tmp_path / "init.safetensors"
    torch.manual_seed(3)
    save_file(named_backbone("torchvision/mobilenet_v3_small", image_size=32).state_dict(), str(init))
    extra = ("model.backbone=torchvision/mobilenet_v3_small", f"model.init={init}")
    full = pretrain(load_config(None, [*BASE, *DATA, *extra, f"train.out_dir={tmp_path}", "train.name=full"]))
    part = pretrain(load_config(None, [*BASE, *DATA, *extra, f"train.out_dir={tmp_path}", "train.name=part",
                                       "train.max_steps=2"]))
    init.unlink()
    done = pretrain(load_config(None, [*BASE, *DATA, *extra, f"train.out_dir={tmp_path}", "train.name=part"]),
                    resume=part.run_dir)
    assert done.step == full.step
    a, b = (load_checkpoint(find_checkpoint(r.run_dir))["model"] for r in (full, done))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sync_batchnorm_keeps_timm_fused_activations():
    """Under DDP on CUDA batch norm becomes SyncBatchNorm: a timm BatchNormAct2d must keep its
    activation (torch's converter would drop it), and our plain BatchNorm layers convert as before."""
    from timm.layers import BatchNormAct2d

    from byol.distributed import sync_batchnorm

    model = torch.nn.Sequential(BatchNormAct2d(4, act_layer=torch.nn.ReLU), torch.nn.BatchNorm2d(4))
    model.eval()
    x = torch.randn(2, 4, 3, 3)
    with torch.no_grad():
        want = model(x)
    synced = sync_batchnorm(model).eval()
    assert all(isinstance(m, torch.nn.SyncBatchNorm) for m in synced)
    with torch.no_grad():  # eval mode: no collective needed, the running statistics are used
        torch.testing.assert_close(synced(x), want)
    with torch.no_grad():
        assert (synced[0](x) >= 0).all()
    plain = sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(4)))
    assert type(plain[0]) is torch.nn.SyncBatchNorm
