"""Optical flow on known motion, streamed in batches; unknown methods are refused."""
import numpy as np
import pytest
from helpers import translating_frames

from cache.flow_codec import dequantize_flow
from pipeline.extract.flow import FlowStream, make_flow_fn, tvl1_available


@pytest.mark.parametrize("method", ["dis", "farneback"] + (["tvl1"] if tvl1_available() else []))
def test_flow_of_a_translating_texture(method):
    frames = translating_frames(6, 128, 171, dx=3)
    flow_stream = FlowStream(method)
    q = np.concatenate([flow_stream.push(frames[:4]), flow_stream.push(frames[4:]), flow_stream.finish()])
    assert q.shape == (6, 128, 171, 2) and q.dtype == np.uint8
    flow = dequantize_flow(q)
    inner = flow[:-1, 16:-16, 16:-16]  # borders have no correspondence
    assert abs(np.median(inner[..., 0]) - 3.0) < 0.3
    assert abs(np.median(inner[..., 1])) < 0.3
    assert np.abs(flow[-1]).max() < 0.1  # last frame has no successor: zero flow


def test_unknown_flow_method_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown flow method 'raft2'"):
        make_flow_fn("raft2")
