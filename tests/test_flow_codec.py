"""The cache's uint8 flow code: zero is exact, the round trip is within half a step, clipped at the bound."""
import json

import numpy as np
import pytest

from cache.fingerprint import CacheError, read_cache_json
from cache.flow_codec import FLOW_BOUND, dequantize_flow, quantize_flow


def test_flow_quantisation_round_trip_and_bound():
    f = np.array([[-50.0, -20.0, -3.3, 0.0, 3.3, 20.0, 50.0]], np.float32)
    back = dequantize_flow(quantize_flow(f))
    assert np.allclose(back, np.clip(f, -20, 20), atol=0.5 * FLOW_BOUND / 127 + 1e-6)


def test_zero_flow_round_trips_exactly_and_the_code_is_symmetric():
    zero = np.zeros((4, 4, 2), np.float32)
    assert (quantize_flow(zero) == 128).all()
    assert (dequantize_flow(quantize_flow(zero)) == 0).all()  # a still scene decodes as still
    f = np.linspace(-FLOW_BOUND, FLOW_BOUND, 101, dtype=np.float32)
    np.testing.assert_allclose(dequantize_flow(quantize_flow(f)), -dequantize_flow(quantize_flow(-f)), atol=1e-6)
    assert quantize_flow(np.float32(-FLOW_BOUND)) == 1 and quantize_flow(np.float32(FLOW_BOUND)) == 255


def test_a_cache_of_the_old_flow_code_is_refused_with_a_re_extract_message(tmp_path):
    (tmp_path / "cache.json").write_text(json.dumps({"format": "vidistill-cache", "format_version": 1,
                                                     "fingerprint": {}}))
    with pytest.raises(CacheError, match="version 1 .*re-extract"):
        read_cache_json(str(tmp_path))
