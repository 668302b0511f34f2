"""Students: shapes, and the inflated 3D EfficientNet-Lite0 reproducing the 2D teacher on a still clip."""
import pytest
import torch
from helpers import center_crop_resize

from models.students import ResNet3d, build_motion_pathway, build_student, inflate_from_teacher, normalize_video
from models.teacher import load_teacher


@pytest.mark.parametrize("arch, dim", [("r3d_cpu", 128), ("r3d_10_half", 256), ("r2plus1d_18", 512),
                                       ("r3d_18", 512), ("mc3_18", 512)])
def test_students_map_clips_to_pooled_features(arch, dim):
    net = build_student(arch).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 4, 32, 32))
    assert out.shape == (2, dim) and net.feature_dim == dim


def test_motion_pathway_is_an_eighth_of_the_visual_width_on_two_channel_flow():
    motion = build_motion_pathway(512)
    assert isinstance(motion, ResNet3d) and motion.feature_dim == 64  # width 8 = 64/8
    assert motion(torch.randn(2, 2, 4, 32, 32)).shape == (2, 64)


def test_unknown_student_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown student 'resnet9000'"):
        build_student("resnet9000")


def test_inflated_net_on_a_still_clip_reproduces_the_teacher():
    from skimage import data
    teacher = load_teacher()
    image = center_crop_resize(data.coffee(), 224)
    logits_2d, embed_2d = teacher.predict(image[None])
    net = inflate_from_teacher(build_student("efficientnet3d_lite0")).eval()
    clip = torch.from_numpy(image).permute(2, 0, 1)[None, :, None].repeat(1, 1, 4, 1, 1)  # [1,3,4,224,224] uint8
    with torch.no_grad():
        embed_3d = net(normalize_video(clip))
        logits_3d = net.logits(normalize_video(clip))
    assert torch.allclose(embed_3d, torch.from_numpy(embed_2d), atol=1e-3)
    assert torch.allclose(logits_3d, torch.from_numpy(logits_2d), atol=1e-2)
    assert int(logits_3d.argmax()) == 967  # espresso, as the image teacher says
    # and it is a real 3D net: a clip that changes over time gives different features
    moving = clip.clone()
    moving[:, :, 2:] = moving[:, :, 2:].flip(-1)
    with torch.no_grad():
        assert not torch.allclose(net(normalize_video(moving)), embed_3d, atol=1e-3)
