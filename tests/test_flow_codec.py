"""The cache's uint8 flow code: round trip within one quantisation step, clipped at the bound."""
import numpy as np

from cache.flow_codec import dequantize_flow, quantize_flow


def test_flow_quantisation_round_trip_and_bound():
    f = np.array([[-50.0, -20.0, -3.3, 0.0, 3.3, 20.0, 50.0]], np.float32)
    back = dequantize_flow(quantize_flow(f))
    assert np.allclose(back, np.clip(f, -20, 20), atol=40 / 255)
