"""Stage one, `cli.py extract`: find videos, decode each once (ffmpeg), run the image teacher and optical
flow, and write the Zarr cache (cache/). `cache show` (preview) draws what it stored."""
