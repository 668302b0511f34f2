"""Optical flow between consecutive stored frames (OpenCV), stored as uint8 with a +-bound.

flow[t] is the motion from frame t to frame t+1 in stored-frame pixels; the last frame of a video
has no successor, so its flow is zero. The uint8 code itself is the cache's (cache/flow_codec.py).
"""
import cv2
import numpy as np

from cache.flow_codec import FLOW_BOUND, quantize_flow

# Parameters are part of the cache fingerprint: change one and old caches are refused.
FLOW_PARAMS = {
    "dis": {"preset": "medium"},
    "farneback": {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5,
                  "poly_sigma": 1.2, "flags": 0},
    "tvl1": {"tau": 0.25, "lambda": 0.15, "theta": 0.3, "nscales": 5, "warps": 5, "epsilon": 0.01},
    "none": {},
}
_DIS_PRESETS = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}


def tvl1_available():
    return hasattr(cv2, "optflow") and hasattr(cv2.optflow, "DualTVL1OpticalFlow_create")


def make_flow_fn(method):
    """Return fn(prev_gray, next_gray) -> float32 [H,W,2] flow for the named method."""
    params = FLOW_PARAMS.get(method)
    if params is None:
        raise ValueError(f"unknown flow method {method!r}; choose from {', '.join(FLOW_PARAMS)}")
    if method == "dis":
        dis = cv2.DISOpticalFlow_create(_DIS_PRESETS[params["preset"]])
        return lambda a, b: dis.calc(a, b, None)
    if method == "farneback":
        p = params
        return lambda a, b: cv2.calcOpticalFlowFarneback(
            a, b, None, p["pyr_scale"], p["levels"], p["winsize"], p["iterations"], p["poly_n"],
            p["poly_sigma"], p["flags"])
    if method == "tvl1":
        if not tvl1_available():
            raise ValueError("flow method 'tvl1' needs OpenCV's contrib module "
                             "(pip install opencv-contrib-python-headless)")
        p = params
        tvl1 = cv2.optflow.DualTVL1OpticalFlow_create(
            tau=p["tau"], lambda_=p["lambda"], theta=p["theta"], nscales=p["nscales"], warps=p["warps"],
            epsilon=p["epsilon"])
        return lambda a, b: tvl1.calc(a, b, None)
    return None  # "none": no flow is stored


class FlowStream:
    """Flow for a video that arrives in batches: remembers the last frame across batch borders.

    push(frames) returns the quantised flow of every frame whose successor is now known (so one
    batch lags by one frame); finish() returns the last frame's (zero) flow.
    """

    def __init__(self, method, bound=FLOW_BOUND):
        self.flow_fn = make_flow_fn(method)
        self.bound = bound
        self.prev = None

    def push(self, frames_rgb):
        grays = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames_rgb]
        if self.prev is not None:
            grays.insert(0, self.prev)
        out = [quantize_flow(self.flow_fn(a, b), self.bound) for a, b in zip(grays[:-1], grays[1:])]
        self.prev = grays[-1]
        h, w = frames_rgb.shape[1:3]
        return np.stack(out) if out else np.empty((0, h, w, 2), np.uint8)

    def finish(self):
        if self.prev is None:
            return None
        h, w = self.prev.shape
        return quantize_flow(np.zeros((1, h, w, 2), np.float32), self.bound)
