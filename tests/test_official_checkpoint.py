"""DeepMind's released BYOL checkpoints in our library (byol.official; docs/fidelity.md).

The fixtures under tests/fixtures/official/ were made by the release's own code
(tools/official_reference/make_checkpoint_fixture.py): ``checkpoint_small.pkl`` is a checkpoint
written by its checkpointing code (dill, protocol 2) for its ResNet-50 at 1/16 width, and
``checkpoint_small.npz`` holds images and the release encoder's representation of them;
``resnet_shapes.json`` names and shapes the networks of the two published checkpoints. These tests
need numpy and torch only (no jax, haiku, tensorflow or dill).
"""
from __future__ import annotations

import json
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.resnet import BasicBlock, Bottleneck

import byol
from byol.cli import main
from byol.config import load_config
from byol.data.errors import DataError
from byol.export import import_official, load_official
from byol.models.backbones import resnet
from byol.models.build import build_encoder
from byol.official import RefusedPickle, load_pickle, read_official
from byol.official.convert import architecture, plan, torch_shape
from byol.official.unpickle import Record, restricted_loads
from conftest import TINY, write_shapes_folder

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official"
CKPT = FIXTURES / "checkpoint_small.pkl"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # the release's dataset.normalize_images
STD = np.array([0.229, 0.224, 0.225], np.float32)


def _release_input(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> what the release's network sees ([0, 1], ImageNet-normalised), as NCHW."""
    x = (images.astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def _max_rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURES / "checkpoint_small.npz"))


@pytest.fixture(scope="module")
def encoder():
    return load_official(CKPT)


def _expect_error(capsys, args, *needles):
    code = main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("byol: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --- the release's pickle format ---------------------------------------------------------------

def test_fixture_is_what_the_release_writes_and_reads_as_records_and_arrays():
    ops = {arg for op, arg, _ in pickletools.genops(CKPT.read_bytes()) if op.name == "GLOBAL"}
    # dill pickles NamedTuples by value; the rng is a jax array; protocol 2 stores bytes via _codecs
    assert {"dill._dill _create_namedtuple", "jax._src.array _reconstruct_array", "_codecs encode",
            "numpy dtype"} <= ops
    data = load_pickle(CKPT)
    assert set(data) == {"experiment_state", "step", "rng"} and data["step"] == 3
    assert type(data["rng"]) is np.ndarray and data["rng"].dtype == np.uint32 and data["rng"].shape == (2,)
    state = data["experiment_state"]
    assert isinstance(state, Record) and state.source == "byol.byol_experiment._ByolExperimentState"
    assert state._fields == ("online_params", "target_params", "online_state", "target_state", "opt_state")
    assert [type(s).source for s in state.opt_state] == [
        "byol.utils.optimizers.AddWeightDecayState", "byol.utils.optimizers.ScaleByLarsState",
        "optax._src.base.EmptyState"]
    conv = state.online_params["res_net50/~/initial_conv"]["w"]
    assert type(conv) is np.ndarray and conv.shape == (7, 7, 3, 4) and conv.dtype == np.float32
    ema = state.online_state["res_net50/~/initial_batchnorm/~/mean_ema"]
    assert set(ema) == {"counter", "hidden", "average"} and int(ema["counter"]) == 2 * 3  # 2 views x 3 steps


def test_old_formats_read_too():
    """numpy 1.x names, by-reference NamedTuples, haiku's pre-2022 FlatMapping, a 2020 DeviceArray
    (a plain ndarray pickle): hand-written streams of the opcodes those versions wrote."""
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    raw = pickle.dumps({"a": arr}, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in raw
    np.testing.assert_array_equal(restricted_loads(raw)["a"], arr)
    scalar = pickle.dumps(np.float32(1.5), protocol=2).replace(b"numpy._core", b"numpy.core")
    assert restricted_loads(scalar) == np.float32(1.5)
    # GLOBAL byol.byol_experiment _ByolExperimentState, EMPTY_TUPLE x5 ... NEWOBJ; then FlatMapping(dict)
    ref = (b"\x80\x02cbyol.byol_experiment\n_ByolExperimentState\n" + b"(" + b")" * 5 + b"t\x81"
           + b"chaiku._src.data_structures\nFlatMapping\n}X\x01\x00\x00\x00aK\x01s\x85R" + b"\x86.")
    rec, flat = restricted_loads(ref)
    assert rec.online_params == () and rec.opt_state == () and flat == {"a": 1} and type(flat) is dict


def test_loads_the_online_or_the_target_encoder():
    online, target = read_official(CKPT), read_official(CKPT, which="target")
    key = "res_net50/~/initial_conv"
    assert online.step == 3 and online.which == "online" and target.which == "target"
    assert not np.array_equal(online.params[key]["w"], target.params[key]["w"])  # independent inits


# --- numerics: our ResNet with padding="same" is the release's network ------------------------

@pytest.mark.parametrize("size", ["64", "45"])
def test_same_padding_reproduces_the_release_forward(encoder, reference, size):
    """Eval mode (moving averages), even and odd input sizes: max relative error ~2e-5 (measured)."""
    ref = reference[f"representation_{size}"]
    with torch.no_grad():
        ours = encoder(_release_input(reference[f"images_{size}"])).numpy()
    assert ours.shape == ref.shape == (2, 128)
    assert _max_rel_error(ours, ref) < 1e-4


@pytest.mark.parametrize("size", ["64", "45"])
def test_symmetric_padding_does_not(encoder, reference, size):
    """The same weights with torchvision's symmetric padding: off by 70-85% of the largest value (measured)."""
    sym = resnet("resnet50", width=1 / 16)
    sym.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        ours = sym.eval()(_release_input(reference[f"images_{size}"])).numpy()
    assert _max_rel_error(ours, reference[f"representation_{size}"]) > 0.2


def test_moving_averages_are_the_debiased_average(encoder):
    """running_mean is haiku's ``average`` (debiased), not its ``hidden`` accumulator."""
    ema = read_official(CKPT).state["res_net50/~/initial_batchnorm/~/mean_ema"]
    np.testing.assert_array_equal(encoder.bn1.running_mean.numpy(), ema["average"].reshape(-1))
    assert not np.allclose(ema["average"], ema["hidden"])
    assert int(encoder.bn1.num_batches_tracked) == int(ema["counter"])


# --- the published checkpoints' networks: names, parameter counts, shapes --------------------

def _shape_tree(tree: dict) -> dict:
    """{module: {leaf: [dims]}} -> leaves with a ``.shape`` only (no memory for ResNet-200 x2)."""
    return {m: {k: np.broadcast_to(np.float32(0), tuple(s)) for k, s in leaves.items()} for m, leaves in tree.items()}


@pytest.mark.parametrize("key, backbone, width, n_params", [
    ("resnet50_x1", "resnet50", 1.0, 23_508_032), ("resnet200_x2", "resnet200", 2.0, 250_128_512)])
def test_published_networks_map_by_name_count_and_shape(key, backbone, width, n_params):
    net = json.loads((FIXTURES / "resnet_shapes.json").read_text())[key]
    params, state = _shape_tree(net["params"]), _shape_tree(net["state"])
    assert architecture(params) == (backbone, width)
    sources = plan(params, state)
    with torch.device("meta"):
        ours = resnet(backbone, width=width)
    expected = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    got = {k: torch_shape(s.kind, params[s.module][s.leaf].shape if s.tree == "params" else
                          state[s.module][s.leaf].shape) for k, s in sources.items()}
    assert got == expected  # every key, every shape
    encoder_modules = {m for m in params if m.startswith("res_net")}
    assert {s.module for s in sources.values() if s.tree == "params"} == encoder_modules  # none left out
    haiku_count = sum(int(np.prod(s)) for m in encoder_modules for s in net["params"][m].values())
    assert haiku_count == sum(p.numel() for p in ours.parameters()) == n_params


def test_unsupported_networks_are_refused_by_name():
    net = json.loads((FIXTURES / "resnet_shapes.json").read_text())["resnet50_x1"]
    params = _shape_tree(net["params"])
    fewer = {m: v for m, v in params.items() if "block_group_2/~/block_5" not in m}
    with pytest.raises(DataError, match=r"\(3, 4, 5, 3\) blocks per group"):
        architecture(fewer)
    v2 = {**params, "res_net50/~/final_batchnorm": {"scale": 0, "offset": 0}}
    with pytest.raises(DataError, match="final_batchnorm"):
        plan(v2, _shape_tree(net["state"]))
    with pytest.raises(DataError, match="no haiku ResNet|expected one haiku ResNet"):
        architecture({"projector/linear": {"w": 0}})


# --- the command: import, then load_encoder / embed / eval as any export -----------------------

def test_import_official_cli_then_load_embed_and_eval(tmp_path, reference, capsys):
    out = tmp_path / "res50.safetensors"
    assert main(["import-official", str(CKPT), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "resnet50 x0.0625" in printed and "padding=same" in printed and str(out) in printed
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["padding"] == "same" and meta["backbone"] == "resnet50" and meta["width"] == 1 / 16
    assert meta["source_format"] == "byol-release" and meta["source_checkpoint"] == str(CKPT)
    assert meta["step"] == 3 and meta["which"] == "online" and meta["augment_semantics"] == "official"
    assert meta["image_size"] == 224 and meta["mean"] == [0.485, 0.456, 0.406] and meta["version"] == 2
    enc = byol.load_encoder(out)
    with torch.no_grad():
        y = enc(_release_input(reference["images_45"])).numpy()
    assert _max_rel_error(y, reference["representation_45"]) < 1e-4
    _expect_error(capsys, ["import-official", str(CKPT), "--out", str(out)], "already exists")

    images = write_shapes_folder(tmp_path / "imgs", n=12, classes=3)
    assert main(["embed", str(out), str(images), "--out", str(tmp_path / "emb.npy"), "--no-progress"]) == 0
    emb = np.load(tmp_path / "emb.npy")
    assert emb.shape == (12, 128) and np.isfinite(emb).all()
    # embedded with the release's evaluation crop and resize, which the export records
    from byol.embed import encoder_transform
    assert "OfficialCenterCrop" in repr(encoder_transform(enc.byol_meta))
    assert main(["embed", str(CKPT), str(images), "--out", str(tmp_path / "pkl.npy"), "--no-progress"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "pkl.npy"), emb, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = tmp_path_factory.mktemp("official") / "res50.safetensors"
    import_official(CKPT, out)
    return out


@pytest.mark.parametrize("protocol", [
    ["knn", "--k", "3"], ["linear", "--epochs", "2", "--lrs", "0.1", "--weight-decays", "0"],
    ["linear", "--protocol", "paper", "--epochs", "1", "--batch-size", "4"],
    ["finetune", "--epochs", "1", "--batch-size", "4", "--labels-fraction", "0.5"]])
def test_eval_takes_an_imported_encoder(imported, tmp_path, capsys, protocol):
    train = write_shapes_folder(tmp_path / "train", n=12, classes=3)
    test = write_shapes_folder(tmp_path / "test", n=6, classes=3)
    assert main(["eval", *protocol, str(imported), "--train", str(train), "--test", str(test),
                 "--device", "cpu", "--workers", "0"]) == 0
    assert "top-1" in capsys.readouterr().out
    _expect_error(capsys, ["eval", protocol[0], str(imported)], "--train and --test", str(imported))


def test_eval_knn_takes_a_release_checkpoint_directly(tmp_path, capsys):
    train = write_shapes_folder(tmp_path / "train", n=9, classes=3)
    test = write_shapes_folder(tmp_path / "test", n=6, classes=3)
    assert main(["eval", "knn", str(CKPT), "--train", str(train), "--test", str(test), "--k", "3",
                 "--device", "cpu", "--workers", "0"]) == 0
    assert "top-1" in capsys.readouterr().out


def test_load_encoder_reads_a_release_checkpoint_directly(encoder, reference):
    enc = byol.load_encoder(CKPT)
    assert enc.byol_meta["padding"] == "same" and enc.byol_meta["source_format"] == "byol-release"
    for k, v in encoder.state_dict().items():
        torch.testing.assert_close(enc.state_dict()[k], v, rtol=0, atol=0)


def test_import_errors_are_one_line(tmp_path, capsys):
    _expect_error(capsys, ["import-official", str(tmp_path / "nope.pkl"), "--out", str(tmp_path / "o.safetensors")],
                  "not found", "nope.pkl")
    (tmp_path / "text.pkl").write_text("not a pickle\n")
    _expect_error(capsys, ["import-official", str(tmp_path / "text.pkl"), "--out", str(tmp_path / "o.safetensors")],
                  "text.pkl", "not a readable pickle")
    (tmp_path / "cut.pkl").write_bytes(CKPT.read_bytes()[:5000])
    _expect_error(capsys, ["import-official", str(tmp_path / "cut.pkl"), "--out", str(tmp_path / "o.safetensors")],
                  "cut.pkl")
    (tmp_path / "other.pkl").write_bytes(pickle.dumps({"weights": np.zeros(3)}, protocol=2))
    _expect_error(capsys, ["import-official", str(tmp_path / "other.pkl"), "--out", str(tmp_path / "o.safetensors")],
                  "other.pkl", "experiment_state")
    assert not (tmp_path / "o.safetensors").exists()


def test_import_official_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["import-official", "--help"])
    assert exit_.value.code == 0 and "example:" in capsys.readouterr().out


# --- anything else in a pickle is refused, and never run ----------------------------------------

class _Touch:
    """Unpickling calls os.system("touch FILE"): the file appears iff the pickle's code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


def _checkpoint_with(payload) -> bytes:
    """A checkpoint-shaped pickle with ``payload`` deep inside its params."""
    return pickle.dumps({"experiment_state": {"online_params": {"m": {"w": payload}}}, "step": 1}, protocol=2)


def test_os_system_is_refused_without_running(tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(_checkpoint_with(_Touch(marker)))
    with pytest.raises(RefusedPickle, match=r"(posix|nt|os)\.system"):
        load_pickle(evil)
    line = _expect_error(capsys, ["import-official", str(evil), "--out", str(tmp_path / "o.safetensors")],
                         "evil.pkl", "system")
    assert "posix.system" in line or "os.system" in line or "nt.system" in line
    with pytest.raises(DataError, match="system"):
        byol.load_encoder(evil)
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("payload, culprit", [
    (_Eval(), "builtins.eval"),
    (__import__("collections").Counter("ab"), "collections.Counter"),
    (__import__("fractions").Fraction(1, 3), "fractions.Fraction"),
    (print, "builtins.print"),
])
def test_any_other_global_is_refused_by_name(tmp_path, payload, culprit):
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(_checkpoint_with(payload))
    with pytest.raises(RefusedPickle) as err:
        load_pickle(bad)
    assert culprit in str(err.value) and "bad.pkl" in str(err.value) and "\n" not in str(err.value)


def test_admitted_helpers_refuse_other_uses():
    """The stand-ins only do their one job: dill's namedtuple only for the release's records, bytes
    only from latin-1 text, jax arrays only through numpy's reconstructor."""
    fake_record = (b"\x80\x02cdill._dill\n_create_namedtuple\nX\x04\x00\x00\x00EvilX\x00\x00\x00\x00\x85"
                   b"X\x02\x00\x00\x00os\x87R.")
    with pytest.raises(RefusedPickle, match="os.Evil"):
        restricted_loads(fake_record)
    with pytest.raises(DataError, match="latin-1"):
        restricted_loads(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(DataError, match="reconstructor"):  # a jax array whose "fun" is not numpy's
        restricted_loads(b"\x80\x02cjax._src.array\n_reconstruct_array\n(cbuiltins\nset\n)NNtR.")
    with pytest.raises(RefusedPickle, match="dill._dill._create_function"):
        restricted_loads(b"\x80\x02cdill._dill\n_create_function\n)R.")
    with pytest.raises(RefusedPickle, match=r"_load_type\('type'\)"):
        restricted_loads(b"\x80\x02cdill._dill\n_load_type\nX\x04\x00\x00\x00type\x85R.")
    # BUILD (set attributes) aimed at a stand-in: our functions and record classes stay as they are
    with pytest.raises(DataError, match="__defaults__"):
        restricted_loads(b"\x80\x02c_codecs\nencode\nN}X\x0c\x00\x00\x00__defaults__X\x01\x00\x00\x00x\x85s\x86b.")
    with pytest.raises(DataError, match="'source' on the record class"):
        restricted_loads(b"\x80\x02cbyol.utils.optimizers\nScaleByLarsState\nN}X\x06\x00\x00\x00source"
                         b"X\x01\x00\x00\x00xs\x86b.")
    with pytest.raises(AttributeError):
        restricted_loads(b"\x80\x02c_codecs\nencode\n}X\x01\x00\x00\x00aK\x01sb.")


def test_import_official_python_api(tmp_path):
    meta = import_official(CKPT, tmp_path / "t.safetensors", which="target")
    assert meta["which"] == "target" and meta["num_tensors"] == len(resnet("resnet50", width=1 / 16).state_dict())


# --- zero_init_residual -------------------------------------------------------------------------

@pytest.mark.parametrize("name, block, last", [("resnet50", Bottleneck, "bn3"), ("resnet18", BasicBlock, "bn2")])
def test_zero_init_residual_zeroes_exactly_the_last_bn_gamma_of_every_block(name, block, last):
    net = resnet(name, width=0.25, zero_init_residual=True)
    blocks = [n for n, m in net.named_modules() if isinstance(m, block)]
    zero = {n for n, m in net.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and not m.weight.any()}
    assert zero == {f"{b}.{last}" for b in blocks} and len(blocks) == (16 if name == "resnet50" else 8)
    for n, m in net.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d) and n not in zero:
            assert torch.equal(m.weight, torch.ones_like(m.weight)), n
    default = resnet(name, width=0.25)  # off by default, as in the paper
    assert all(m.weight.all() for m in default.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_config_keys_reach_the_encoder():
    enc = build_encoder(load_config(None, [*TINY, "model.padding=same", "model.zero_init_residual=true"]))
    assert enc.padding == "same" and not enc.layer1[0].bn2.weight.any()
    assert resnet("resnet18").padding == "symmetric"
