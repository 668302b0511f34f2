"""A generated action benchmark whose answer depends on *what* moves and *how* it moves.

Every clip shows one real photograph (scikit-image's chelsea the cat, coffee, rocket, astronaut), cut out
with a soft elliptical mask and jittered in scale and colour, on a real texture (grass, gravel,
brick; tinted), moving in one of 8 ways (translate left/right/up/down, rotate cw/ccw, zoom in/out)
at a random speed from a random start. The `object` and `motion` labels are drawn independently, and
each clip is a real H.264 file, so the whole pipeline runs on it unchanged.

Layout of ROOT:
    pool/clip_00000.mp4 ...                 unlabelled videos for extract + distill
    labelled/videos/clip_00000.mp4 ...      labelled videos
    labelled/object/<object>/clip_*.mp4     symlinks: `eval --task folder --root ROOT/labelled/object`
    labelled/motion/<motion>/clip_*.mp4     symlinks: `eval --task folder --root ROOT/labelled/motion`
    labelled/labels.csv                     id,object,motion,speed,start_x,start_y
    benchmark.json                          the generator's parameters (a rerun with the same ones is a no-op)
"""
import csv
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from pipeline.extract.decode import write_video

# label -> the scikit-image photo: labels are plain words, so zero-shot can read them as class names
PHOTOS = {"cat": "chelsea", "coffee": "coffee", "rocket": "rocket", "astronaut": "astronaut"}
OBJECTS = tuple(PHOTOS)
MOTIONS = ("left", "right", "up", "down", "rotate_cw", "rotate_ccw", "zoom_in", "zoom_out")
TEXTURES = ("grass", "gravel", "brick")
WIDTH, HEIGHT, FPS = 172, 128, 8


def skimage_images(names):
    """{name: image} of scikit-image's bundled pictures (no download), e.g. {"cat": "chelsea"}."""
    from skimage import data
    return {label: getattr(data, name)() for label, name in names.items()}


def default_photos():
    """The demo's objects: label -> RGB photo."""
    return skimage_images(PHOTOS)


def default_textures():
    """The demo's backgrounds: name -> grayscale texture."""
    return skimage_images({name: name for name in TEXTURES})


def as_rgb(image):
    """uint8 [H,W,3] from a grayscale, RGB or RGBA picture."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (255 * (image.astype(np.float32) / max(float(image.max()), 1e-9))).astype(np.uint8)
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=-1)
    return image[..., :3]


def as_gray(image):
    """uint8 [H,W] luma of a grayscale or colour picture (the backgrounds are tinted grey textures)."""
    image = as_rgb(image)
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)


def _digest(images):
    """Short content hashes, so benchmark.json tells one set of pictures from another."""
    return {name: hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest()[:16] for name, img in images.items()}


def background(rng, textures):
    """A random crop of a real texture, tinted, at canvas size (uint8 [H,W,3])."""
    tex = textures[rng.integers(len(textures))]
    scale = rng.uniform(0.4, 0.7)
    h, w = min(tex.shape[0], int(HEIGHT / scale)), min(tex.shape[1], int(WIDTH / scale))
    top, left = rng.integers(0, tex.shape[0] - h + 1), rng.integers(0, tex.shape[1] - w + 1)
    crop = cv2.resize(tex[top:top + h, left:left + w].astype(np.float32), (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)
    tint = rng.uniform(0.5, 1.0, size=3)
    return np.clip(crop[..., None] * tint * 0.8, 0, 255).astype(np.uint8)


def cutout(photo, rng, size):
    """The photo's central square, jittered in colour, with a soft elliptical alpha (float [s,s,3], [s,s])."""
    h, w = photo.shape[:2]
    side = min(h, w)
    square = photo[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    img = cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    img = np.clip(img * rng.uniform(0.8, 1.2) * rng.uniform(0.9, 1.1, size=3), 0, 255)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    c = (size - 1) / 2
    # an ellipse (not a circle) so that rotation shows in the silhouette too
    r = ((xx - c) / (0.5 * size)) ** 2 + ((yy - c) / (0.36 * size)) ** 2
    alpha = np.clip((1.0 - r) * 6, 0, 1)
    return img, alpha


def trajectory(motion, n, rng, size):
    """Per-frame (cx, cy, angle_deg, scale) of the object; starts are placed so it stays in view."""
    speed = {"translate": rng.uniform(2.0, 3.5), "rotate": rng.uniform(5.0, 10.0), "zoom": rng.uniform(1.03, 1.05)}
    t = np.arange(n, dtype=np.float32)
    margin = size * 0.6
    cx, cy = rng.uniform(margin, WIDTH - margin), rng.uniform(margin, HEIGHT - margin)
    angle, scale = np.zeros(n), np.ones(n)
    x, y = np.full(n, cx), np.full(n, cy)
    if motion in ("left", "right", "up", "down"):
        v = speed["translate"]
        travel = v * (n - 1)
        if motion in ("left", "right"):
            lo, hi = margin, max(margin, WIDTH - margin - travel)
            start = rng.uniform(lo, hi)
            x = start + v * t if motion == "right" else (WIDTH - start) - v * t
        else:
            lo, hi = margin, max(margin, HEIGHT - margin - travel)
            start = rng.uniform(lo, hi)
            y = start + v * t if motion == "down" else (HEIGHT - start) - v * t
        rate = v
    elif motion in ("rotate_cw", "rotate_ccw"):
        rate = speed["rotate"]
        angle = rng.uniform(0, 360) + (-1 if motion == "rotate_cw" else 1) * rate * t  # cv2: + is anticlockwise
    else:
        rate = speed["zoom"]
        scale = rate ** t if motion == "zoom_in" else rate ** (n - 1 - t)
        scale = scale / scale.max() * rng.uniform(1.1, 1.4)  # largest frame at 1.1-1.4x the base size
    return np.stack([x, y, angle, scale], 1), float(rate)


def render_clip(photo, motion, rng, textures, n_frames):
    """uint8 [T,H,W,3] frames of one clip, plus its trajectory [T,4] and motion rate."""
    size = int(rng.integers(34, 50))
    img, alpha = cutout(photo, rng, size)
    bg = background(rng, textures).astype(np.float32)
    path, rate = trajectory(motion, n_frames, rng, size)
    frames = []
    c = (size - 1) / 2
    for cx, cy, angle, scale in path:
        m = cv2.getRotationMatrix2D((c, c), float(angle), float(scale))
        m[:, 2] += (cx - c, cy - c)
        obj = cv2.warpAffine(img, m, (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR)
        a = cv2.warpAffine(alpha, m, (WIDTH, HEIGHT), flags=cv2.INTER_LINEAR)[..., None]
        frame = bg * (1 - a) + obj * a
        frames.append(np.clip(frame + rng.normal(0, 2, frame.shape), 0, 255).astype(np.uint8))  # sensor noise
    return np.stack(frames), path, rate


def generate_benchmark(root, n_pool=160, n_labelled=160, n_frames=24, seed=0, progress=None, photos=None,
                       textures=None):
    """Write the benchmark under root (see the module docstring). Returns the parameters dict.

    photos: {object label: picture} (default: the demo's four scikit-image photos); textures: {name:
    picture} for the backgrounds (default: grass, gravel, brick). Another set of pictures and another
    seed make another benchmark of the same kind, to check that a result is not about these pictures."""
    photos = {k: as_rgb(v) for k, v in (photos or default_photos()).items()}
    textures = {k: as_gray(v) for k, v in (textures or default_textures()).items()}
    objects = tuple(photos)
    params = {"n_pool": n_pool, "n_labelled": n_labelled, "n_frames": n_frames, "seed": seed, "fps": FPS,
              "size": [WIDTH, HEIGHT], "objects": list(objects), "motions": list(MOTIONS),
              "photos": _digest(photos), "textures": _digest(textures), "version": 3}
    marker = os.path.join(root, "benchmark.json")
    if os.path.exists(marker) and json.load(open(marker)) == params:
        return params
    for folder in ("pool", "labelled"):  # another benchmark's videos and label links must not linger
        shutil.rmtree(os.path.join(root, folder), ignore_errors=True)
    textures = list(textures.values())
    rng = np.random.default_rng(seed)
    todo = [(kind, i, f"clip_{i:05d}.mp4") for kind, n in (("pool", n_pool), ("labelled", n_labelled))
            for i in range(n)]
    # every clip's labels come from one generator, in order, and its pixels from its own: the clips are
    # rendered and encoded side by side (one thread per core; OpenCV and ffmpeg leave the GIL) and the
    # files are the same as one at a time
    labels = [(objects[rng.integers(len(objects))], MOTIONS[rng.integers(len(MOTIONS))]) for _ in todo]

    def write_clip(kind, i, name, obj, motion):
        clip_rng = np.random.default_rng([seed, 0 if kind == "pool" else 1, i])
        frames, path, rate = render_clip(photos[obj], motion, clip_rng, textures, n_frames)
        out = os.path.join(root, "pool" if kind == "pool" else os.path.join("labelled", "videos"), name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        write_video(out, frames, FPS)
        return path, rate

    rows = []
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        futures = [pool.submit(write_clip, *clip, *label) for clip, label in zip(todo, labels)]
        try:
            for k, ((kind, _, name), (obj, motion), future) in enumerate(zip(todo, labels, futures)):
                path, rate = future.result()
                if kind == "labelled":
                    rows.append({"id": name, "object": obj, "motion": motion, "speed": round(rate, 4),
                                 "start_x": round(float(path[0, 0]), 2), "start_y": round(float(path[0, 1]), 2)})
                    for label_set, label in (("object", obj), ("motion", motion)):
                        link = os.path.join(root, "labelled", label_set, label, name)
                        os.makedirs(os.path.dirname(link), exist_ok=True)
                        if not os.path.lexists(link):
                            os.symlink(os.path.join("..", "..", "videos", name), link)
                if progress:
                    progress(k + 1, len(todo))
        except BaseException:  # Ctrl-C or a failed clip: stop now, not after every queued clip
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    with open(os.path.join(root, "labelled", "labels.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(marker, "w") as f:
        json.dump(params, f, indent=2)
    return params
