"""Where a student starts: inflation reproduces the image network on a still clip, whatever the
architecture; students without an image network, and files that do not fit, get one line."""
import pytest
import torch
import torchvision
from helpers import center_crop_resize, tiny_checkpoint

from models.inflate import IMAGENET_MEAN, IMAGENET_STD, InflateError, inflate_student
from models.start import StartError, backbone_state, record_label, start_backbone, start_label
from models.students import build_student, normalize_video
from models.teacher import load_teacher


def still_clip(image_uint8_hwc, frames=4):
    """[1,3,T,H,W] uint8: one picture repeated."""
    return torch.from_numpy(image_uint8_hwc).permute(2, 0, 1)[None, :, None].repeat(1, 1, frames, 1, 1)


@pytest.mark.parametrize("variant, size", [("efficientnet_lite0", 224),
                                           pytest.param("efficientnet_lite1", 240, marks=pytest.mark.slow),
                                           pytest.param("efficientnet_lite2", 260, marks=pytest.mark.slow)])
def test_inflated_efficientnet_on_a_still_clip_is_its_image_teacher(variant, size):
    from skimage import data
    teacher = load_teacher(variant)
    image = center_crop_resize(data.coffee(), size)
    logits_2d, embed_2d = teacher.predict(image[None])
    arch = variant.replace("_", "3d_")
    net, path = inflate_student(build_student(arch), arch)
    net.eval()
    clip = normalize_video(still_clip(image, 3))
    with torch.no_grad():
        embed_3d, logits_3d = net(clip), net.logits(clip)
    from models.teacher import default_weights_path
    assert path == default_weights_path(variant)  # the shipped weights file
    assert torch.allclose(embed_3d, torch.from_numpy(embed_2d), atol=1e-3)
    assert torch.allclose(logits_3d, torch.from_numpy(logits_2d), atol=1e-2)
    assert int(logits_3d.argmax()) == int(logits_2d.argmax()) == 967  # espresso
    moving = still_clip(image, 3)
    moving[:, :, 1:] = moving[:, :, 1:].flip(-1)  # a real 3D net: a clip that changes gives other features
    with torch.no_grad():
        assert not torch.allclose(net(normalize_video(moving)), embed_3d, atol=1e-3)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    """A 2D ResNet-18 state dict as a user would save torchvision's, with BatchNorm statistics and
    affines off their defaults (so a mapping that skipped them would show)."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    path = tmp_path_factory.mktemp("r18") / "resnet18.pth"
    torch.save(net.state_dict(), path)
    return str(path), net.eval()


@pytest.mark.parametrize("arch", ["r3d_18", "mc3_18"])
def test_inflated_video_resnet_on_a_still_clip_is_resnet18(arch, resnet18_file):
    path, image_net = resnet18_file
    image_net.maxpool, image_net.fc = torch.nn.Identity(), torch.nn.Identity()  # the video nets have no stem max-pool
    image = torch.randint(0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    x = (image.permute(2, 0, 1)[None].float() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    net, _ = inflate_student(build_student(arch), arch, path)
    with torch.no_grad():
        f2d, f3d = image_net(x), net.eval()(normalize_video(still_clip(image.numpy(), 8)))
    # exact but for the image border, where the two input normalisations pad different values
    assert torch.nn.functional.cosine_similarity(f2d, f3d).item() > 0.9999
    assert (f2d - f3d).abs().max() < 0.01 * f2d.abs().max()
    scratch = build_student(arch).eval()
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(f2d, scratch(normalize_video(still_clip(image.numpy(), 8)))) < 0.9


def test_students_without_an_image_network_get_one_line_naming_those_with_one(resnet18_file):
    for arch, why in (("r2plus1d_18", "45 channels"), ("r3d_cpu", "no image network of its shape")):
        with pytest.raises(InflateError) as e:
            inflate_student(build_student(arch), arch, resnet18_file[0])
        line = str(e.value)
        assert "\n" not in line and arch in line and why in line
        assert "efficientnet3d_lite0" in line and "r3d_18 (from a 2D ResNet-18 weights file)" in line


def test_a_resnet_without_weights_or_with_the_wrong_file_is_one_line(tmp_path):
    with pytest.raises(InflateError, match="pass --init-weights FILE"):
        inflate_student(build_student("r3d_18"), "r3d_18")
    from models.teacher import default_weights_path
    with pytest.raises(InflateError, match="no 'conv1.weight'; it is not a ResNet-18 state dict"):
        inflate_student(build_student("r3d_18"), "r3d_18", default_weights_path())
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not torch")
    with pytest.raises(InflateError, match="junk.pth: not a readable weights file"):
        inflate_student(build_student("mc3_18"), "mc3_18", str(junk))


def test_a_student_goes_on_from_a_checkpoint_or_a_torchvision_export(tmp_path):
    (tmp_path / "run").mkdir()
    ckpt = tiny_checkpoint(str(tmp_path / "run" / "checkpoint.pt"), student="r3d_cpu")
    net = build_student("r3d_cpu")
    record = start_backbone(net, "r3d_cpu", str(tmp_path / "run"))  # RUN/ stands for RUN/checkpoint.pt
    saved = torch.load(ckpt, weights_only=True)["model"]
    assert all(torch.equal(v, saved[f"backbone.{k}"]) for k, v in net.state_dict().items())
    assert record["init"] == "path" and record_label(record) == "from-run" == start_label(str(tmp_path / "run"))
    with pytest.raises(StartError, match="a r3d_cpu checkpoint; this run's student is r3d_18 \\(pass --student r3d_cpu\\)"):
        start_backbone(build_student("r3d_18"), "r3d_18", ckpt)
    # the stock torchvision video model's state dict, fc included, as `cli.py export` writes it
    stock = torchvision.models.video.r3d_18()
    torch.save(stock.state_dict(), tmp_path / "r3d_18-torchvision.pt")
    net = build_student("r3d_18")
    start_backbone(net, "r3d_18", str(tmp_path / "r3d_18-torchvision.pt"))
    assert torch.equal(net.net.stem[0].weight, stock.stem[0].weight)
    with pytest.raises(StartError, match="do not fit a mc3_18"):
        backbone_state(str(tmp_path / "r3d_18-torchvision.pt"), "mc3_18", build_student("mc3_18"))
    scripted = torch.jit.script(build_student("r3d_cpu"))
    scripted.save(str(tmp_path / "scripted.pt"))
    with pytest.raises(StartError, match="TorchScript or ONNX export cannot be trained on"):
        start_backbone(build_student("r3d_cpu"), "r3d_cpu", str(tmp_path / "scripted.pt"))
    with pytest.raises(StartError, match="no such file"):
        start_backbone(build_student("r3d_cpu"), "r3d_cpu", str(tmp_path / "nowhere"))


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    """A timm ViT-Tiny state dict as a user would save one (random weights: nothing downloads)."""
    import timm
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, dynamic_img_size=True)
    path = tmp_path_factory.mktemp("vit") / "vit_tiny.pth"
    torch.save(net.state_dict(), path)
    net.reset_classifier(0)
    return str(path), net.eval()


def test_inflated_video_vit_on_a_still_clip_is_its_image_vit_and_learns_time(vit_file):
    path, image_net = vit_file
    arch = "vit3d:vit_tiny_patch16_224"
    image = torch.randint(0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    x = (image.permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.5  # this ViT's own statistics
    net, _ = inflate_student(build_student(arch), arch, path)
    net.eval()
    with torch.no_grad():
        f2d, f3d = image_net(x), net(normalize_video(still_clip(image.numpy(), 4)))
    assert f3d.shape == (1, 192) and net.feature_dim == 192
    assert torch.allclose(f2d, f3d, atol=1e-4)  # the temporal attention starts as the identity
    # its temporal part is trainable: one gradient step on a moving clip moves it off the identity
    moving = still_clip(image.numpy(), 4)
    moving[:, :, 2:] = moving[:, :, 2:].flip(-1)
    net.train()
    net(normalize_video(moving)).pow(2).sum().backward()
    assert net.temporal[0].attn.out_proj.weight.grad.abs().sum() > 0
    with pytest.raises(InflateError, match="not a timm vit_small_patch16_224 state dict"):
        inflate_student(build_student("vit3d:vit_small_patch16_224"), "vit3d:vit_small_patch16_224", path)
    with pytest.raises(ValueError, match="student vit3d:resnet18: timm cannot build it as a ViT"):
        build_student("vit3d:resnet18")


def test_auto_starts_from_the_image_network_where_its_weights_are_at_hand():
    from models.start import auto_init
    assert auto_init("efficientnet3d_lite0") == "inflate"  # shipped
    assert auto_init("r3d_18") == "scratch" and auto_init("r3d_18", "resnet18.pth") == "inflate"
    assert auto_init("r3d_cpu", "resnet18.pth") == "scratch"  # no image network of its shape
