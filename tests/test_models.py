"""The model contract of DESIGN.md for every registry model, at a small width."""
import pytest
import torch
from torch import nn
from torchvision.models import ResNet
from torchvision.models.vision_transformer import VisionTransformer

from models import MODELS, build_model
from models.mlp import MLP_HIDDEN

WIDTH = 1 / 16
NUM_CLASSES = 7
SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
CONV_NETS = [name for name in MODELS if not name.startswith(("mlp", "vit"))]
# feature_dim at WIDTH: the last stage's channels scaled by 1/16 (x4 for ResNet-50's bottleneck);
# the ViTs scale the head dimension 64 -> 4 (ViT-B 12 heads, ViT-Ti 3)
FEATURE_DIM = {"mlp": round(MLP_HIDDEN * WIDTH), "resnet18": 32, "resnet34": 32, "resnet50": 128,
               "wrn16_8": 32, "wrn28_10": 40, "wrn40_10": 40, "vgg11_bn": 32, "vgg16_bn": 32, "vit_b_4": 48, "vit_tiny_4": 12}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and lose much on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(name, shape, width=WIDTH):
    torch.manual_seed(0)
    channels, size, _ = shape
    return build_model(name, channels, size, NUM_CLASSES, width).eval()


def batch(shape, n=2):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))


def hooks_of(module):
    return {name: getattr(module, name) for name in
            ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
            if getattr(module, name, None)}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_contract(name, shape):
    model = small_model(name, shape)
    x = batch(shape)
    with torch.no_grad():
        features = model.features(x)
        logits = model(x)
        assert model.feature_dim == FEATURE_DIM[name]
        assert features.shape == (2, model.feature_dim)
        assert isinstance(model.classifier, nn.Linear)
        assert (model.classifier.in_features, model.classifier.out_features) == (model.feature_dim, NUM_CLASSES)
        assert logits.shape == (2, NUM_CLASSES)
        assert torch.equal(logits, model.classifier(features))
        assert torch.isfinite(logits).all()
    assert not any(hooks_of(m) for m in model.modules())
    assert not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks
    assert model.convolutional == (name in CONV_NETS)
    if model.convolutional and shape[0] == 3:  # the memory format main.py uses with --channels-last
        with torch.no_grad():
            got = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(got, logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mlp", "resnet18", "wrn16_8", "vgg11_bn", "vit_tiny_4"])
def test_training_step_reaches_every_parameter(name):
    model = small_model(name, (3, 32, 32)).train()
    loss = model(batch((3, 32, 32), n=4)).square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnets_are_torchvision_with_cifar_stem(name):
    body = small_model(name, (3, 32, 32)).body
    assert isinstance(body, ResNet)
    assert body.conv1.kernel_size == (3, 3) and body.conv1.stride == (1, 1)
    assert isinstance(body.maxpool, nn.Identity)
    assert body.layer1[0].conv1.in_channels == body.conv1.out_channels == 4


@pytest.mark.parametrize("name, blocks", [("wrn16_8", 6), ("wrn28_10", 12), ("wrn40_10", 18)])
def test_wide_resnet_depth(name, blocks):
    model = small_model(name, (3, 32, 32))
    residual = [m for m in model.modules() if type(m).__name__ == "_WideBlock"]
    assert len(residual) == blocks


@pytest.mark.parametrize("name, heads", [("vit_b_4", 12), ("vit_tiny_4", 3)])
def test_vits_are_torchvision_with_4x4_patches(name, heads):
    body = small_model(name, (3, 32, 32)).body
    assert isinstance(body, VisionTransformer)
    assert body.patch_size == 4 and len(body.encoder.layers) == 12
    assert body.encoder.layers[0].self_attention.num_heads == heads


def test_vit_refuses_an_image_size_not_divisible_by_the_patch():
    with pytest.raises(ValueError, match="divisible"):
        build_model("vit_tiny_4", 3, 30, 10, WIDTH)
