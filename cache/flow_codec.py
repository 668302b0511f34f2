"""How flow is stored: clipped to +-bound and quantised to uint8 (the TSN convention).

A storage concern, so it lives with the cache: the extractor encodes with it, the reader decodes.
0 px/frame is ~127.5 and one step is 2*bound/255 px (0.16 px at the default bound of 20).
"""
import numpy as np

FLOW_BOUND = 20.0


def quantize_flow(flow, bound=FLOW_BOUND):
    """float [...,2] px/frame -> uint8, clipped to +-bound."""
    q = (np.clip(flow, -bound, bound) + bound) * (255.0 / (2 * bound))
    return np.rint(q).astype(np.uint8)


def dequantize_flow(q, bound=FLOW_BOUND):
    """uint8 -> float32 px/frame (the inverse of quantize_flow up to one quantisation step)."""
    return q.astype(np.float32) * (2 * bound / 255.0) - bound
