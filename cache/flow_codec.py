"""How flow is stored: clipped to +-bound and quantised to uint8 around a zero at code 128.

A storage concern, so it lives with the cache: the extractor encodes with it, the reader decodes.
Code 128 is exactly 0 px/frame (a still scene decodes as still, with no drift), codes 1..255 cover
[-bound, +bound] in steps of bound/127 px (0.16 px at the default bound of 20); code 0 is unused.
FLOW_CODEC names this code in the cache fingerprint, so caches written with another code are refused.
"""
import numpy as np

FLOW_BOUND = 20.0
FLOW_CODEC = "uint8, 128 = 0, step bound/127"
_STEPS = 127  # codes on each side of zero


def quantize_flow(flow, bound=FLOW_BOUND):
    """float [...,2] px/frame -> uint8, clipped to +-bound; 0 maps to 128 exactly."""
    q = np.rint(np.clip(flow, -bound, bound) * (_STEPS / bound)) + 128
    return q.astype(np.uint8)


def dequantize_flow(q, bound=FLOW_BOUND):
    """uint8 -> float32 px/frame (the inverse of quantize_flow up to half a step)."""
    return (q.astype(np.float32) - 128) * np.float32(bound / _STEPS)
