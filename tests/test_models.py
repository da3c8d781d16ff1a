"""The CIFAR model zoo: registry, exact architectures (parameter counts), the ModelOutput contract.

CPU only, batch size 2, no training; each model is built and run once per session (cached).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from ckd_study.models import ModelOutput, UnknownModelError, ZooModel, available_models, create_model

ALL_MODELS = sorted(
    [
        "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
        "resnet8x4", "resnet32x4",
        "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
        "vgg8", "vgg11", "vgg13", "vgg16", "vgg19",
        "MobileNetV2", "ShuffleV1", "ShuffleV2",
        "ResNet18", "ResNet50",
    ]
)  # fmt: skip

# Exact parameter counts for num_classes=100 (computed once from these implementations; they equal the
# RepDistiller definitions, whose state dicts load into them with strict=True). Any architecture change
# shows up here.
EXACT_PARAMS_100 = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "MobileNetV2": 812_836,
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
    "ResNet18": 11_220_132,
    "ResNet50": 23_705_252,
}

# Published sizes (millions, 2 decimals; CRD / RepDistiller / mdistiller tables), num_classes=100.
PUBLISHED_M = {
    "resnet8": 0.08,
    "resnet14": 0.18,
    "resnet20": 0.28,
    "resnet32": 0.47,
    "resnet44": 0.67,
    "resnet56": 0.86,
    "resnet110": 1.74,
    "resnet8x4": 1.23,
    "resnet32x4": 7.43,
    "wrn_16_1": 0.18,
    "wrn_16_2": 0.70,
    "wrn_40_1": 0.57,
    "wrn_40_2": 2.26,
    "vgg8": 3.97,
    "vgg13": 9.46,
    "MobileNetV2": 0.81,
    "ShuffleV1": 0.95,
    "ShuffleV2": 1.36,
    "ResNet50": 23.7,
}

RESNET_LIKE = [n for n in ALL_MODELS if n.startswith(("resnet", "ResNet"))]
# models whose every stage k >= 1 satisfies feats[k] == relu(preact_feats[k])
RELU_OF_PREACT_ALL_STAGES = RESNET_LIKE + ["ShuffleV1", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19"]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny batch-2 CPU work: one intra-op thread is as fast and immune to oversubscription when other test
    processes share the cores. Restored afterwards so other test modules are unaffected."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=None)
def built(name: str) -> tuple[ZooModel, torch.Tensor, ModelOutput]:
    """(eval-mode model, input, output) for num_classes=100, computed once per session."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=100).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    return model, x, out


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    # activations of untrained, eval-mode deep nets can be large: compare relative to their scale
    scale = max(1.0, b.abs().max().item())
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


# ----------------------------------------------------------------------------------------------- registry


def test_available_models_is_exactly_the_zoo():
    assert available_models() == ALL_MODELS
    assert len(ALL_MODELS) == 23
    assert set(EXACT_PARAMS_100) == set(ALL_MODELS)


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownModelError) as info:
        create_model("nope")
    msg = str(info.value)
    assert "nope" in msg
    for name in ALL_MODELS:
        assert name in msg
    assert isinstance(info.value, KeyError)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "10", None])
def test_bad_num_classes_raises(bad):
    with pytest.raises(ValueError):
        create_model("resnet8", num_classes=bad)


# --------------------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("name", ALL_MODELS)
def test_exact_parameter_count(name):
    model, _, _ = built(name)
    assert n_params(model) == EXACT_PARAMS_100[name]


@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_parameter_count_matches_published(name):
    count = EXACT_PARAMS_100[name]
    published = PUBLISHED_M[name] * 1e6
    if name == "resnet8":  # 0.08M: 1% of a 2-decimal rounding is meaningless
        assert round(count / 1e6, 2) == 0.08
    else:
        assert abs(count - published) <= 0.01 * published, (count, published)


@pytest.mark.parametrize("name,num_classes", [("resnet8", 10), ("wrn_16_1", 10), ("ShuffleV2", 10), ("vgg8", 10)])
def test_num_classes_changes_only_the_classifier(name, num_classes):
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes).eval()
    assert model.num_classes == num_classes
    assert model.classifier.out_features == num_classes
    delta = (100 - num_classes) * (model.pooled_dim + 1)
    assert n_params(model) == EXACT_PARAMS_100[name] - delta
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, num_classes)


# ------------------------------------------------------------------------------------- output contract


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_contract(name):
    model, _, out = built(name)
    assert isinstance(out, ModelOutput)
    assert model.num_classes == 100
    assert out.logits.shape == (2, 100)
    assert isinstance(model.stage_channels, tuple) and all(isinstance(c, int) for c in model.stage_channels)
    assert isinstance(model.pooled_dim, int)
    assert len(out.feats) == len(out.preact_feats) == len(model.stage_channels)
    for k, (f, p) in enumerate(zip(out.feats, out.preact_feats)):
        assert f.dim() == 4 and f.shape[0] == 2
        assert f.shape[1] == model.stage_channels[k], (k, tuple(f.shape))
        assert p.shape == f.shape, (k, tuple(p.shape), tuple(f.shape))
    assert out.pooled.shape == (2, model.pooled_dim)
    hs = [f.shape[2] for f in out.feats]
    ws = [f.shape[3] for f in out.feats]
    assert all(a >= b for a, b in zip(hs, hs[1:])), hs
    assert all(a >= b for a, b in zip(ws, ws[1:])), ws
    assert hs[-1] < hs[0]
    for t in [out.logits, out.pooled, *out.feats, *out.preact_feats]:
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_pooled_is_what_the_classifier_reads(name):
    model, _, out = built(name)
    # a linear layer; MobileNetV2 wraps it in a one-element Sequential, as RepDistiller does (its keys)
    linear = model.classifier[0] if name == "MobileNetV2" else model.classifier
    assert isinstance(linear, torch.nn.Linear)
    assert linear.in_features == model.pooled_dim
    with torch.no_grad():
        assert torch.allclose(model.classifier(out.pooled), out.logits, atol=1e-6)


PINNED_SHAPES = {
    "resnet8x4": ([(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)], 256),
    "resnet32x4": ([(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)], 256),
    "wrn_40_2": ([(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8)], 128),
    "vgg13": ([(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)], 512),
    "resnet56": ([(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)], 64),
    "ResNet50": ([(64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4)], 2048),
    "MobileNetV2": ([(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2)], 1280),
    "ShuffleV1": ([(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4)], 960),
    "ShuffleV2": ([(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4)], 1024),
}


@pytest.mark.parametrize("name", sorted(PINNED_SHAPES))
def test_pinned_feature_shapes(name):
    model, _, out = built(name)
    shapes, pooled_dim = PINNED_SHAPES[name]
    assert [tuple(f.shape) for f in out.feats] == [(2, *s) for s in shapes]
    assert [tuple(f.shape) for f in out.preact_feats] == [(2, *s) for s in shapes]
    assert model.stage_channels == tuple(s[0] for s in shapes)
    assert model.pooled_dim == pooled_dim
    assert tuple(out.pooled.shape) == (2, pooled_dim)


# ---------------------------------------------------------------------------------------- preact vs post


@pytest.mark.parametrize("name", RESNET_LIKE + ["wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "ShuffleV1"])
def test_last_stage_is_relu_of_preact(name):
    _, _, out = built(name)
    assert torch.equal(out.feats[-1], F.relu(out.preact_feats[-1]))
    assert (out.preact_feats[-1] < 0).any()  # really taken before the ReLU


@pytest.mark.parametrize("name", RELU_OF_PREACT_ALL_STAGES)
def test_every_stage_is_relu_of_preact(name):
    _, _, out = built(name)
    # RepDistiller convention: the stem entry is the post-ReLU tensor in both lists
    assert torch.equal(out.preact_feats[0], out.feats[0])
    for k in range(1, len(out.feats)):
        assert torch.equal(out.feats[k], F.relu(out.preact_feats[k])), k


@pytest.mark.parametrize("name", ["wrn_16_1", "wrn_40_2"])
def test_wrn_preact_is_next_stage_bn(name):
    model, _, out = built(name)
    with torch.no_grad():
        assert torch.equal(out.preact_feats[1], model.block2.layer[0].bn1(out.feats[1]))
        assert torch.equal(out.preact_feats[2], model.block3.layer[0].bn1(out.feats[2]))
        assert torch.equal(out.preact_feats[3], model.bn1(model.block3(out.feats[2])))
        assert torch.allclose(out.pooled, out.feats[-1].mean(dim=(2, 3)), atol=1e-6)


def test_shufflev2_preact_is_unshuffled_concat():
    # RepDistiller's ShuffleV2 preact features are taken before the block's channel shuffle
    model, _, out = built("ShuffleV2")
    for k, layer in enumerate([model.layer1, model.layer2, model.layer3], start=1):
        assert torch.equal(out.feats[k], layer[-1].shuffle(F.relu(out.preact_feats[k])))


def test_mobilenetv2_has_no_separate_preact():
    _, _, out = built("MobileNetV2")
    for f, p in zip(out.feats, out.preact_feats):
        assert f is p


# ------------------------------------------------------------------------------- checkpoints, autograd


@pytest.mark.parametrize(
    "name,key",
    [
        ("resnet8x4", "layer1.0.downsample.0.weight"),
        ("resnet32x4", "fc.weight"),
        ("wrn_40_2", "block1.layer.0.convShortcut.weight"),
        ("wrn_40_2", "bn1.running_var"),
        ("vgg13", "block0.3.weight"),
        ("vgg13", "block4.4.running_mean"),
        ("ResNet50", "layer1.0.shortcut.1.weight"),
        ("ResNet50", "linear.weight"),
        ("ShuffleV1", "layer3.3.bn3.weight"),
        ("ShuffleV2", "layer2.7.conv3.weight"),
        ("MobileNetV2", "blocks.6.0.conv.7.running_var"),
        ("MobileNetV2", "classifier.0.weight"),
    ],
)
def test_state_dict_keys_follow_repdistiller(name, key):
    model, _, _ = built(name)
    assert key in model.state_dict()


def _repdistiller_mobile_half_shapes(num_classes: int = 100) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of RepDistiller's / mdistiller's ``mobile_half`` (models/mobilenetv2.py:
    expansion 6, width 0.5) with its shape, written from that definition: conv_bn stem, InvertedResidual
    ``conv`` Sequentials (pw 0/1, dw 3/4, pw-linear 6/7), conv_1x1_bn head, ``classifier = Sequential(Linear)``."""
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(key, out_c, in_c, k):
        shapes[f"{key}.weight"] = (out_c, in_c, k, k)

    def bn(key, c):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{key}.{name}"] = (c,)
        shapes[f"{key}.num_batches_tracked"] = ()

    conv("conv1.0", 16, 3, 3)
    bn("conv1.1", 16)
    inp = 16
    for i, (t, c, n) in enumerate([(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3),
                                   (6, 320, 1)]):
        oup = c // 2
        for j in range(n):
            hidden, key = inp * t, f"blocks.{i}.{j}.conv"
            conv(f"{key}.0", hidden, inp, 1)
            bn(f"{key}.1", hidden)
            conv(f"{key}.3", hidden, 1, 3)  # depthwise
            bn(f"{key}.4", hidden)
            conv(f"{key}.6", oup, hidden, 1)
            bn(f"{key}.7", oup)
            inp = oup
    conv("conv2.0", 1280, inp, 1)
    bn("conv2.1", 1280)
    shapes["classifier.0.weight"] = (num_classes, 1280)
    shapes["classifier.0.bias"] = (num_classes,)
    return shapes


def test_mobilenetv2_loads_a_repdistiller_state_dict_strictly():
    shapes = _repdistiller_mobile_half_shapes()
    g = torch.Generator().manual_seed(0)
    theirs = {k: (torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g) * 0.1)
              for k, s in shapes.items()}
    for k in theirs:
        if k.endswith("running_var"):
            theirs[k] = theirs[k].abs() + 0.5
    model = create_model("MobileNetV2", num_classes=100).eval()
    assert set(model.state_dict()) == set(shapes)
    model.load_state_dict(theirs, strict=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, theirs[k]), k
    # the parameter count is the pinned one, and the loaded classifier.0 is what maps pooled to logits
    assert n_params(model) == EXACT_PARAMS_100["MobileNetV2"]
    assert sum(math.prod(s) for k, s in shapes.items() if k.rsplit(".", 1)[1] in ("weight", "bias")) == n_params(model)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32, generator=g))
    expected = out.pooled @ theirs["classifier.0.weight"].T + theirs["classifier.0.bias"]
    assert torch.allclose(out.logits, expected, atol=1e-5)


def test_mobilenetv2_still_loads_its_earlier_classifier_keys():
    torch.manual_seed(1)
    source = create_model("MobileNetV2", num_classes=10)
    earlier = {k.replace("classifier.0.", "classifier."): v for k, v in source.state_dict().items()}
    assert "classifier.weight" in earlier and "classifier.0.weight" not in earlier
    model = create_model("MobileNetV2", num_classes=10)
    model.load_state_dict(earlier, strict=True)
    assert torch.equal(model.classifier[0].weight, source.classifier[0].weight)
    assert torch.equal(model.classifier[0].bias, source.classifier[0].bias)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "ShuffleV2", "MobileNetV2", "vgg8"])
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).train()
    out = model(torch.randn(2, 3, 32, 32))
    # use the returned features as well: fails if an in-place op clobbered a tensor autograd needs
    loss = out.logits.logsumexp(1).mean() + sum(f.square().mean() for f in [*out.feats, *out.preact_feats])
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert sum(p.grad.abs().sum().item() for p in model.parameters()) > 0


def test_logits_only_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = create_model("resnet8x4", num_classes=10).train()
    model(torch.randn(2, 3, 32, 32)).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["resnet8x4", "wrn_16_2", "ShuffleV1", "ShuffleV2", "MobileNetV2"])
def test_channels_last_matches(name):
    model, x, out = built(name)
    model_cl = create_model(name, num_classes=100).eval()
    model_cl.load_state_dict(model.state_dict())
    model_cl = model_cl.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out_cl = model_cl(x.to(memory_format=torch.channels_last))
    assert close(out_cl.logits, out.logits)
    for a, b in zip([*out_cl.feats, *out_cl.preact_feats], [*out.feats, *out.preact_feats]):
        assert close(a, b)


@pytest.mark.parametrize("name", ["resnet8", "ShuffleV2"])
def test_dynamo_traces_without_graph_breaks(name):
    model, x, out = built(name)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        out_c = compiled(x)
    assert isinstance(out_c, ModelOutput)
    assert close(out_c.logits, out.logits)
    assert len(out_c.feats) == len(out.feats)
