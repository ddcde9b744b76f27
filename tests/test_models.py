"""Backbones: stages compose to forward, heads, weight files (local state_dicts, configs), errors."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from engine.models import (
    SPECS,
    WeightsMissing,
    available_backbones,
    backbone_spec,
    build_backbone,
    build_multihead,
    first_trainable_stage,
    head_features,
    registry,
    split_at_stage,
    stage_of_layer,
)
from engine.models.mcunet import ProxylessNASNet
from engine.models.mcunet_configs import builtin_config
from engine.models.registry import BackboneEntry


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared, oversubscribed 2-core machine two OpenMP threads spin-wait
    and run small convolutions up to 100x slower (measured: MobileNetV2 2x3x64x64 0.03 s vs 4 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# small inputs keep this fast; every family works off its native resolution
TEST_RES = {"swin_t": 64, "small-cnn": 32, "alexnet-cl": 32, "resnet18-reduced": 32}


def _check_stages(model: nn.Module, res: int, atol: float = 1e-5) -> torch.Tensor:
    model.eval()
    x = torch.randn(2, 3, res, res)
    with torch.no_grad():
        expected = model(x)
        out = x
        for _, stage in model.stages():
            out = stage(out)
    assert out.shape == expected.shape
    assert torch.allclose(out, expected, atol=atol), (out - expected).abs().max()
    return expected


@pytest.mark.parametrize("name", [n for n in available_backbones() if not n.startswith("mcunet") or n == "mcunet-in3"])
def test_every_backbone_builds_and_stages_equal_forward(name):
    torch.manual_seed(0)
    bb = build_backbone(name, weights="none", num_classes=7)
    assert bb.name == name and bb.num_classes == 7 and bb.weights == "none"
    assert len(bb.mean) == 3 and len(bb.std) == 3 and bb.resolution >= 32
    out = _check_stages(bb.model, TEST_RES.get(name, 64))
    assert out.shape == (2, 7)
    # the stage views list exactly the model's parameters (same objects), nothing twice
    stage_params = [p for _, s in bb.model.stages() for p in s.parameters()]
    assert {id(p) for p in stage_params} == {id(p) for p in bb.model.parameters()}


def test_mcunet_in3_builtin_config_matches_upstream_shape():
    model = build_backbone("mcunet-in3", weights="none").model
    assert model.resolution == 176 and len(model.blocks) == 18
    names = dict(model.named_modules())
    for key in ("first_conv.conv", "blocks.1.mobile_inverted_conv.inverted_bottleneck.conv",
                "blocks.17.mobile_inverted_conv.depth_conv.conv", "classifier.linear"):
        assert key in names
    assert "blocks.0.mobile_inverted_conv.inverted_bottleneck" not in names  # expand ratio 1: no 1x1 expand
    assert names["blocks.17.mobile_inverted_conv.depth_conv.conv"].kernel_size == (7, 7)
    assert names["blocks.17.mobile_inverted_conv.depth_conv.conv"].groups == 480
    assert head_features(model) == (160, 1000)
    assert sum(p.numel() for p in model.parameters()) == 737_408  # as many as the upstream ImageNet state_dict holds


def test_mcunet_from_local_json_and_state_dict(tmp_path):
    """A variant whose config and weights are only in the weights folder (upstream file names)."""
    config = builtin_config("mcunet-in3")
    config["blocks"] = config["blocks"][:6]
    config["blocks"][-1]["mobile_inverted_conv"]["out_channels"] = 24
    config["feature_mix_layer"] = {"name": "ConvLayer", "kernel_size": 1, "stride": 1, "in_channels": 24,
                                   "out_channels": 32, "use_bn": True, "act_func": "relu6", "bias": False}
    config["classifier"]["in_features"] = 32
    config["resolution"] = 96
    folder = tmp_path / "weights" / "mcunet-in0"
    folder.mkdir(parents=True)
    (folder / "mcunet-10fps_imagenet.json").write_text(json.dumps(config))
    torch.manual_seed(1)
    reference = ProxylessNASNet(config)
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    torch.save({"state_dict": reference.state_dict()}, folder / "mcunet-10fps_imagenet.pth")
    bb = build_backbone("mcunet-in0", weights="imagenet", weights_dir=tmp_path / "weights")
    assert bb.resolution == 96 and bb.weights.endswith("mcunet-10fps_imagenet.pth")
    x = torch.randn(2, 3, 96, 96)
    reference.eval()
    assert torch.allclose(bb.model.eval()(x), reference(x), atol=1e-5)
    _check_stages(bb.model, 96)
    assert [n for n, _ in bb.model.stages()][-2:] == ["feature_mix_layer", "head"]
    # head replaced when the class count differs; the trunk keeps the loaded weights
    bb10 = build_backbone("mcunet-in0", weights="imagenet", weights_dir=tmp_path / "weights", num_classes=10)
    assert head_features(bb10.model) == (32, 10)
    assert torch.equal(bb10.model.first_conv.conv.weight, reference.first_conv.conv.weight)


def test_mismatched_state_dict_is_a_clear_error(tmp_path):
    sd = build_backbone("small-cnn", weights="none").model.state_dict()
    path = tmp_path / "wrong.pt"
    torch.save(sd, path)
    with pytest.raises(ValueError, match="do not match this backbone"):
        build_backbone("mcunet-in3", weights=str(path))
    with pytest.raises(WeightsMissing, match="does not exist"):
        build_backbone("small-cnn", weights=str(tmp_path / "nope.pt"))


def test_torchvision_weights_from_local_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    monkeypatch.setenv("LANCE_OFFLINE", "1")
    torch.manual_seed(3)
    source = build_backbone("resnet18", weights="none").model
    path = tmp_path / "resnet18_finetuned.pth"
    torch.save(source.state_dict(), path)
    loaded = build_backbone("resnet18", weights=str(path), num_classes=5)
    assert loaded.weights == str(path.resolve())
    assert torch.equal(loaded.model.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    assert head_features(loaded.model) == (512, 5)
    # "imagenet" finds the torchvision file name in the weights folder (as from a download elsewhere)
    filename = backbone_spec("resnet18").weights.file_names[0]
    (tmp_path / "w" / "resnet18").mkdir(parents=True)
    torch.save(source.state_dict(), tmp_path / "w" / "resnet18" / filename)
    monkeypatch.setenv("LANCE_WEIGHTS_DIR", str(tmp_path / "w"))
    bb = build_backbone("resnet18")  # default weights: imagenet
    assert bb.weights.endswith(filename) and bb.num_classes == 1000
    assert torch.equal(bb.model.fc.weight, source.fc.weight)
    # and in the torch hub cache
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    filename_mb = backbone_spec("mobilenet_v2").weights.file_names[0]
    mb = build_backbone("mobilenet_v2", weights="none").model
    torch.save(mb.state_dict(), hub / filename_mb)
    assert build_backbone("mobilenet_v2", weights="imagenet").weights == f"imagenet:{hub / filename_mb}"


def test_missing_weights_offline_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("LANCE_OFFLINE", "1")
    with pytest.raises(WeightsMissing) as info:
        build_backbone("mcunet-in3", weights="imagenet", weights_dir=tmp_path / "empty")
    message = str(info.value)
    assert "mcunet-in3_imagenet.pth" in message and str(tmp_path / "empty") in message
    assert "--weights none" in message and "hanlab18.mit.edu" in message
    with pytest.raises(WeightsMissing, match="mcunet-512kb-2mb_imagenet.pth"):
        build_backbone("mcunet-in4", weights="imagenet", weights_dir=tmp_path / "empty")
    # the config is built in: random init needs no file
    assert build_backbone("mcunet-in4", weights="none", weights_dir=tmp_path / "empty").resolution == 160
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_backbone("small-cnn", weights="imagenet")


def test_vit_tiny_linear_inputs_are_3d_and_swin_4d():
    vit = build_backbone("vit-tiny", weights="none", num_classes=3).model
    cfg = (vit.patch_embed.proj.kernel_size, vit.pos_embed.shape, len(vit.blocks), vit.blocks[0].attn.heads)
    assert cfg == ((16, 16), (1, 197, 192), 12, 3)
    seen = {}

    def hook(name):
        def record(module, inputs, output):  # returns None: the output is left alone
            seen.setdefault(name, inputs[0].dim())
        return record

    for name, m in vit.named_modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(hook(name))
    vit.eval()(torch.randn(1, 3, 64, 64))  # 4x4 patches: position table interpolated
    assert seen["blocks.0.attn.qkv"] == 3 and seen["blocks.11.mlp.fc2"] == 3 and seen["head"] == 2
    swin = build_backbone("swin_t", weights="none", num_classes=3).model
    dims = {}
    swin.features[1][0].mlp[0].register_forward_hook(lambda m, i, o: dims.update(mlp=i[0].dim()))
    swin.eval()(torch.randn(1, 3, 64, 64))
    assert dims["mlp"] == 4


def test_split_at_stage_and_layer_lookup():
    torch.manual_seed(0)
    model = build_backbone("mcunet-in3", weights="none", num_classes=10).model.eval()
    names = [n for n, _ in model.stages()]
    assert names[0] == "first_conv" and names[-1] == "head" and len(names) == 20
    last4 = ["blocks.17.mobile_inverted_conv.inverted_bottleneck.conv", "classifier.linear"]
    cut = stage_of_layer(model, last4[0])
    assert names[cut] == "blocks.17" and stage_of_layer(model, last4[1]) == len(names) - 1
    prefix, suffix = split_at_stage(model, cut)
    assert suffix.names == ["blocks.17", "head"] and len(prefix) == cut
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(suffix(prefix(x)), model(x), atol=1e-5)
    with pytest.raises(ValueError, match="out of range"):
        split_at_stage(model, len(names))
    for p in model.parameters():
        p.requires_grad_(False)
    model.blocks[17].mobile_inverted_conv.point_linear.conv.weight.requires_grad_(True)
    assert first_trainable_stage(model) == cut
    # a layer swapped in after the split is used by the suffix (paths resolve at call time)
    model.classifier.linear = nn.Linear(160, 10)
    nn.init.zeros_(model.classifier.linear.weight)
    nn.init.constant_(model.classifier.linear.bias, 2.0)
    with torch.no_grad():
        assert torch.allclose(suffix(prefix(x)), torch.full((2, 10), 2.0))


def test_multihead_cl_networks():
    for name, features in (("alexnet-cl", 2048), ("resnet18-reduced", 640)):
        model = build_multihead(name, [2, 3, 5], seed=0)
        assert model.features.out_features == features
        assert [h.out_features for h in model.heads] == [2, 3, 5]
        assert all(h.bias is None for h in model.heads)
        x = torch.randn(4, 3, 32, 32)
        model.eval()
        with torch.no_grad():
            shared = model.features(x)
            for task, k in enumerate([2, 3, 5]):
                out = model(x, task)
                assert out.shape == (4, k)
                assert torch.allclose(out, model.heads[task](shared), atol=1e-5)
            model.set_task(2)
            assert torch.allclose(model(x), model(x, 2))
            _check_stages(model, 32)
        with pytest.raises(ValueError):
            model.set_task(3)
    # GPM's AlexNet shapes and BN with batch statistics
    alex = build_multihead("alexnet-cl", [10]).features
    assert (alex.conv1.kernel_size, alex.conv2.kernel_size, alex.conv3.kernel_size) == ((4, 4), (3, 3), (2, 2))
    assert alex.fc1.in_features == 1024 and not alex.bn1.track_running_stats
    a, b = build_multihead("resnet18-reduced", [2], seed=5), build_multihead("resnet18-reduced", [2], seed=5)
    assert torch.equal(a.features.conv1.weight, b.features.conv1.weight)
    assert [a.features.layer1[0].conv1.out_channels, a.features.layer4[0].conv1.out_channels] == [20, 160]


def test_small_cnn_trains_on_digits_in_seconds():
    from engine.data import get_dataset

    torch.manual_seed(0)
    bb = build_backbone("small-cnn", weights="none", num_classes=10)
    train = get_dataset("digits", "train", bb.resolution, bb.mean, bb.std)
    test = get_dataset("digits", "test", bb.resolution, bb.mean, bb.std)
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    opt = torch.optim.Adam(bb.model.parameters(), lr=1e-2)
    bb.model.train()
    for _ in range(4):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(bb.model(x), y).backward()
            opt.step()
    bb.model.eval()
    x, y = test.batch(range(len(test)))
    with torch.no_grad():
        acc = (bb.model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9, acc


def _count_macs(model: nn.Module, resolution: int) -> int:
    """Multiply-adds of convolutions and linear layers in one forward pass of a (1, 3, R, R) input."""
    total = [0]

    def hook(module, _inputs, out):
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total[0] += out.numel() * per_output
        elif isinstance(module, nn.Linear):
            total[0] += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, resolution, resolution))
    for h in handles:
        h.remove()
    return total[0]


@pytest.mark.parametrize("name", [n for n in available_backbones() if n.startswith("mcunet")])
def test_every_mcunet_variant_is_built_in_with_the_published_size(name):
    """Each model-zoo config builds without any file, with the README's parameter count and MACs."""
    entry = backbone_spec(name)
    model = build_backbone(name, weights="none").model
    params = sum(p.numel() for p in model.parameters())
    macs = _count_macs(model, entry.resolution)
    assert model.resolution == entry.resolution == builtin_config(name)["resolution"]
    assert (params, macs) == (entry.num_params, entry.macs)
    published = entry.meta["published"]  # README precision: 1 or 2 significant decimals in millions
    digits = len(str(published["params_m"]).split(".")[1])
    assert round(params / 1e6, digits) == published["params_m"]
    assert round(macs / 1e6, 1) == published["macs_m"]
    _check_stages(model, 32 if entry.resolution < 64 else 64)


@pytest.mark.parametrize("name", available_backbones())
def test_registry_entry_describes_the_built_model(name, tmp_path):
    entry = backbone_spec(name)
    model = entry.builder(tmp_path)  # an empty weights folder
    assert sum(p.numel() for p in model.parameters()) == entry.num_params
    assert head_features(model)[1] == entry.default_classes
    if entry.pretrained:
        assert entry.weights.url.startswith("https://") and entry.weights.file_names
        if entry.weights.hash_prefix:
            assert entry.weights.hash_prefix in entry.weights.url
    assert entry.macs is None or entry.macs > 0


def test_a_new_backbone_is_one_registry_entry(tmp_path):
    entry = BackboneEntry(name="tiny-test-net", family="small", builder=lambda _folder: nn.Sequential(),
                          resolution=32, mean=(0.5,) * 3, std=(0.5,) * 3, description="test", num_params=0)
    try:
        registry.register(entry)
        assert backbone_spec("tiny-test-net") is entry
        with pytest.raises(ValueError, match="registered twice"):
            registry.register(entry)
    finally:
        registry.REGISTRY.pop("tiny-test-net", None)
    with pytest.raises(ValueError, match="unknown backbone 'tiny-test-net'; choose one of: .*mcunet-in0"):
        backbone_spec("tiny-test-net")
    assert list(SPECS)[:5] == [f"mcunet-in{i}" for i in range(5)]
