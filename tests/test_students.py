"""Students: shapes and the motion pathway (inflation: tests/test_inflate.py)."""
import pytest
import torch

from models.students import ResNet3d, build_motion_pathway, build_student


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
