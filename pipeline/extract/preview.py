"""`cli.py cache show`: one cached video as a contact sheet, the first thing to look at when numbers
look odd.

Each column is one stored frame: the frame as stored, its optical flow under it (the usual colour
wheel: hue = direction, brightness = speed, full brightness at the sheet's 99th-percentile speed),
and the teacher's top classes with their probabilities (softmax of the stored logits at temperature
1), for each of the cache's teachers. With a teacher the columns are teacher frames, spread evenly over
the video. A cache without flow or without a teacher simply leaves that panel out.
"""
import dataclasses
import difflib
import os

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cache.fingerprint import cache_teachers, teacher_array
from cache.reader import CacheReader
from models.imagenet import class_names
from pipeline.common.errors import PreviewError
from pipeline.common.teacher_spec import parse_teacher

PAD = 8  # pixels between tiles and around the sheet
GAP = 4  # between the panels of one column
PER_ROW = 4  # columns per row of the sheet
FONT_SIZE = 13
LINE = 17  # pixels per line of text
TITLE_LINES = 3
MIN_FULL_SPEED = 1.0  # px/frame: a nearly still video stays dark instead of showing amplified noise




@dataclasses.dataclass
class Layout:
    """Where everything goes: one place, so the size of a sheet is known before it is drawn."""
    columns: int
    tile_h: int
    tile_w: int
    flow: bool
    top: int  # top classes per teacher and column (0: no teacher)
    teachers: int = 1  # several: each one's classes under a line with its name

    @property
    def teacher_lines(self):
        return self.teachers * (self.top + (self.teachers > 1)) if self.top else 0

    @property
    def per_row(self):
        return min(self.columns, PER_ROW)

    @property
    def rows(self):
        return -(-self.columns // PER_ROW)

    @property
    def cell_h(self):
        return LINE + self.tile_h + (GAP + self.tile_h if self.flow else 0) + (GAP + self.teacher_lines * LINE
                                                                                 if self.top else 0)

    @property
    def title_h(self):
        return TITLE_LINES * LINE + PAD

    @property
    def size(self):
        """(width, height) of the sheet in pixels."""
        width = PAD + self.per_row * (self.tile_w + PAD)
        return width, PAD + self.title_h + self.rows * (self.cell_h + PAD)

    def origin(self, i):
        r, c = divmod(i, PER_ROW)
        return PAD + c * (self.tile_w + PAD), PAD + self.title_h + r * (self.cell_h + PAD)


def show_video(cfg):
    """Draw the contact sheet of cfg.video_id to cfg.out. Returns a summary dict."""
    reader = CacheReader(cfg.cache)
    rec = _record(reader, cfg.video_id)
    fp = reader.fingerprint
    has_flow = fp["flow"]["method"] != "none"
    teachers = cache_teachers(fp)
    has_teacher = bool(teachers)
    logits = tuple(teacher_array("logits", slot) for slot in range(len(teachers)))
    n = rec["frame_count"]
    teacher_frames = reader.read(cfg.video_id, fields=("logits",))["teacher_frame"] if has_teacher else np.zeros(0, int)
    chosen = pick_frames(n, teacher_frames, cfg.frames)
    panels = []
    for i in chosen:
        d = reader.read(cfg.video_id, int(i), int(i) + 1, fields=(("frames",) + (("flow",) if has_flow else ())
                                                               + logits))
        panels.append(d)
    full = max(MIN_FULL_SPEED, float(np.percentile(
        np.concatenate([np.linalg.norm(d["flow"][0], axis=-1).ravel() for d in panels]), 99))) if has_flow else None
    h, w = reader.frame_size
    layout = Layout(len(chosen), h * cfg.scale, w * cfg.scale, has_flow, cfg.top if has_teacher else 0,
                    max(1, len(teachers)))
    names = teacher_class_names(reader.meta.get("config", {}), teachers)
    sheet = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(sheet)
    font = _font()
    fps = fp["preprocessing"]["fps"]
    _title(sheet, draw, font, layout, cfg, rec, fps, full, has_flow, has_teacher)
    for k, (i, d) in enumerate(zip(chosen, panels)):
        x, y = layout.origin(k)
        last = " (last: no flow)" if has_flow and i == n - 1 else ""
        draw.text((x, y), f"frame {i}  ·  {i / fps:.2f} s{last}", fill="black", font=font)
        y += LINE
        sheet.paste(_tile(d["frames"][0], cfg.scale), (x, y))
        y += layout.tile_h
        if has_flow:
            sheet.paste(_tile(flow_to_rgb(d["flow"][0], full), cfg.scale), (x, y + GAP))
            y += GAP + layout.tile_h
        y += GAP
        for slot, (teacher, classes) in enumerate(zip(teachers, names)):
            if len(teachers) > 1:
                draw.text((x, y), _fit(draw, font, teacher["name"], layout.tile_w), fill="black", font=font)
                y += LINE
            _top_classes(draw, font, (x, y), d[logits[slot]][0], classes, cfg.top, layout.tile_w)
            y += cfg.top * LINE
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    sheet.save(cfg.out)
    return {"out": cfg.out, "size": sheet.size, "frames": [int(i) for i in chosen], "video_frames": n,
            "full_speed": full, "flow": has_flow, "teacher": has_teacher, "teachers": [t["name"] for t in teachers]}


def teacher_class_names(config, teachers):
    """Each teacher's class names, in slot order: from its --teacher-classes file, as the cache's
    extraction config records it, while that file still holds one name per class; else ImageNet's for
    a 1000-class teacher (a CLIP teacher's logits are its zero-shot ImageNet classifier); else "class N"."""
    files = [config.get("teacher_classes"), *(parse_teacher(t)[2] for t in config.get("more_teachers") or ())]
    out = []
    for teacher, path in zip(teachers, files + [None] * len(teachers)):
        names = []
        if path and os.path.isfile(path):
            with open(path) as f:
                names = [line.strip() for line in f if line.strip()]
        out.append(names if len(names) == teacher["num_classes"] else class_names(teacher["num_classes"]))
    return out


def _record(reader, video_id):
    try:
        rec = reader.record(video_id)
    except KeyError:
        close = difflib.get_close_matches(video_id, [v.decode() for v in reader.index.ids], n=3)
        raise PreviewError(f"video {video_id!r} is not in {reader.cache_dir}"
                           + (f"; did you mean {', '.join(map(repr, close))}?" if close else
                              f" ({len(reader.index)} videos; `cli.py cache info {reader.cache_dir}` lists them)")) from None
    if rec["status"] == "failed" or not rec["frame_count"]:
        raise PreviewError(f"video {video_id!r} has no frames in {reader.cache_dir}: {rec.get('error') or 'empty'}")
    return rec


def pick_frames(n_frames, teacher_frames, k):
    """Up to k frame indices spread evenly over the video: over the frames the teacher saw when it saw
    some (so every column has its classes), else over all frames."""
    pool = np.asarray(teacher_frames) if len(teacher_frames) else np.arange(n_frames)
    if len(pool) <= k:
        return [int(i) for i in pool]
    return [int(pool[j]) for j in np.linspace(0, len(pool) - 1, k).round().astype(int)]


def flow_to_rgb(flow, full_speed):
    """float [H,W,2] px/frame -> uint8 RGB [H,W,3]: hue = direction (angle of (dx, dy) in image
    coordinates, red = rightwards), saturation 1, value = speed / full_speed, clipped at 1."""
    dx, dy = flow[..., 0], flow[..., 1]
    hsv = np.empty(flow.shape[:2] + (3,), np.uint8)
    angle = (np.degrees(np.arctan2(dy, dx)) % 360) / 2  # OpenCV's 8-bit hue runs 0..179
    hsv[..., 0] = np.round(angle).astype(np.uint8) % 180
    hsv[..., 1] = 255
    hsv[..., 2] = np.round(np.clip(np.hypot(dx, dy) / full_speed, 0, 1) * 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def colour_wheel(size):
    """The key to flow_to_rgb: every direction at every speed up to full, in a disc."""
    r = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    flow = np.stack([(xx - r) / r, (yy - r) / r], -1)
    rgb = flow_to_rgb(flow, 1.0)
    rgb[np.hypot(*(flow.transpose(2, 0, 1))) > 1] = 255
    return rgb


def _tile(image, scale):
    im = Image.fromarray(np.ascontiguousarray(image))
    return im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale != 1 else im


def _font():
    try:  # DejaVu Sans ships with matplotlib (a requirement): the same letters everywhere
        import matplotlib.font_manager as fm
        return ImageFont.truetype(fm.findfont("DejaVu Sans"), FONT_SIZE)
    except Exception:
        return ImageFont.load_default()


def _fit(draw, font, text, width):
    """text, shortened with an ellipsis until it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _title(sheet, draw, font, layout, cfg, rec, fps, full, has_flow, has_teacher):
    wheel = LINE * TITLE_LINES
    width = layout.size[0] - 3 * PAD - (wheel if has_flow else 0)
    size = (f"; source {rec['src_width']}x{rec['src_height']} {rec.get('src_codec') or ''} "
            f"{rec.get('src_fps') or 0:g} fps" if rec.get("src_width") else "")
    lines = [f"{cfg.video_id}  ({rec['status']}{': ' + rec['error'] if rec.get('error') else ''})",
             f"{rec['frame_count']} frames, {fps:g} fps, {rec['frame_count'] / fps:.1f} s{size}; in {cfg.cache}",
             (f"flow: full brightness = {full:.1f} px/frame, hue = direction (key at right)" if has_flow
              else "no flow in this cache")
             + ("; teacher: top classes, softmax of the stored logits" if has_teacher else "; no teacher outputs")]
    for k, text in enumerate(lines):
        draw.text((PAD, PAD + k * LINE), _fit(draw, font, text, width), fill="black", font=font)
    if has_flow:
        sheet.paste(Image.fromarray(colour_wheel(wheel)), (layout.size[0] - PAD - wheel, PAD))


def _top_classes(draw, font, xy, logits, names, top, width):
    x, y = xy
    logits = logits.astype(np.float32)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    for rank, c in enumerate(np.argsort(-p)[:top]):
        draw.text((x, y + rank * LINE), _fit(draw, font, f"{100 * p[c]:5.1f}%  {names[c]}", width),
                  fill="black" if rank == 0 else (70, 70, 70), font=font)
