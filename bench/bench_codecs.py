"""What each way of storing frames and flow costs and loses, per array, on real clips.

Extracts the clips once losslessly (--frame-codec zstd --flow-codec zstd, every other setting at its
default), then codes every stored frame and flow field again with each candidate and reports, per
array: KB per video-second, frame PSNR (dB) and flow end-point error (px, against the lossless flow
codes) and decode time per frame; the baseline in the same run is the lossless row (ratio = its bytes
over the candidate's).

    python bench/bench_codecs.py --videos ../shared/data/clips --work /tmp/bench_codecs
"""
import argparse
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cache.codecs import decode_chunk, encode_chunk
from cache.flow_codec import dequantize_flow
from cache.manifest import cache_info
from cache.reader import CacheReader
from pipeline.common.config import ExtractConfig
from pipeline.distill.clips import ClipDataset
from pipeline.extract.extract import run_extract

CANDIDATES = {"frames": [("zstd", 0), ("jpeg", 95), ("jpeg", 90), ("jpeg", 80)],
              "flow": [("zstd", 0), ("jpeg", 95), ("jpeg", 90), ("jpeg", 80)]}


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 99.0 if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", default=os.path.join(REPO, "..", "shared", "data", "clips"))
    ap.add_argument("--work", default="/tmp/bench_codecs")
    args = ap.parse_args()
    cache = os.path.join(args.work, "lossless")
    run_extract(ExtractConfig(videos=args.videos, cache=cache, frame_codec="zstd", flow_codec="zstd", progress=False,
                              shard=(0, 1)))
    reader = CacheReader(cache)
    info = cache_info(cache)
    seconds = info["video_seconds"]
    bound = reader.flow_bound
    print(f"{len(reader)} videos, {info['frames']} frames = {seconds:.1f} video-seconds at "
          f"{reader.frame_size[0]}x{reader.frame_size[1]}")
    rows = {"frames": [], "flow": []}
    for vid in reader.ids:
        got = reader.frames_at(vid, np.arange(reader.num_frames(vid)), with_flow=True)
        rows["frames"].append(got["frames"])
        rows["flow"].append(got["flow_codes"])
    print("\n| array | codec | KB per video-second | ratio to lossless | PSNR dB (frames) / EPE px (flow) | "
          "decode ms per frame |")
    print("|---|---|---|---|---|---|")
    for name, candidates in CANDIDATES.items():
        data = np.concatenate(rows[name])
        base = None
        for codec, quality in candidates:
            t, stored, err = 0.0, 0, []
            for row in data:
                blob = encode_chunk(row[None], codec, quality)
                stored += len(blob)
                t0 = time.perf_counter()
                back = decode_chunk(blob, codec, (1,) + row.shape, np.uint8)[0]
                t += time.perf_counter() - t0
                if name == "frames":
                    err.append(psnr(row, back))
                else:
                    epe = np.linalg.norm(dequantize_flow(back, bound) - dequantize_flow(row, bound), axis=-1)
                    err.append(epe.mean())
            kb = stored / 1e3 / seconds
            base = base or kb
            label = codec if codec == "zstd" else f"jpeg q{quality}"
            quality_text = f"{np.mean(err):.1f}" if name == "frames" else f"{np.mean(err):.3f}"
            print(f"| {name} | {label} | {kb:.1f} | {base / kb:.1f}x | {quality_text} | {1e3 * t / len(data):.2f} |")
    parts = os.path.join(cache, "parts")
    for name in ("logits", "embed", "teacher_frame"):
        size = sum(os.path.getsize(os.path.join(d, f)) for p in os.listdir(parts)
                   for d, _, fs in os.walk(os.path.join(parts, p, name)) for f in fs)
        print(f"| {name} | zstd (fp16) | {size / 1e3 / seconds:.1f} | – | lossless | – |")

    # what a training item costs to read: the default (JPEG) cache against the lossless one, the
    # demo's clip settings, decoding every time (no chunk cache) and through a warm chunk cache
    default = os.path.join(args.work, "default")
    run_extract(ExtractConfig(videos=args.videos, cache=default, progress=False, shard=(0, 1)))
    print(f"\ndefault settings ({CacheReader(default).fingerprint['storage']}): "
          f"{cache_info(default)['bytes'] / 1e3 / seconds:.0f} KB per video-second in all files; "
          f"lossless: {info['bytes'] / 1e3 / seconds:.0f}")
    print("\n| cache | item | ms per item, decoded every time | ms per item, warm chunk cache |")
    print("|---|---|---|---|")
    for label, path in (("lossless (zstd)", cache), ("default (JPEG)", default)):
        for item, kw in (("distinit clip", dict(teacher_fields=("logits",))),
                         ("modist pair + flow", dict(with_flow=True, teacher_fields=(), two_views=True))):
            times = []
            for budget in (0, 512):
                data = ClipDataset(CacheReader(path, chunk_cache_mb=budget), clip_len=8, stride=2, crop=64,
                                   crop_scale=0.6, **kw)
                for epoch in range(2 if budget else 1):  # the warm figure is the second epoch
                    t0 = time.perf_counter()
                    for i in range(len(data)):
                        data[(epoch, i)]
                    elapsed = (time.perf_counter() - t0) / len(data)
                times.append(elapsed)
            print(f"| {label} | {item} | {1e3 * times[0]:.1f} | {1e3 * times[1]:.1f} |")


if __name__ == "__main__":
    main()
