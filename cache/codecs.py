"""How frame and flow chunks are coded inside the cache's Zarr arrays: JPEG (lossy, ~10x smaller) or
zstd (lossless).

A chunk is one frame ([1, H, W, C] uint8). JPEG codes C = 3 as a colour image and C = 1 or 2 (flow's
u and v codes) as grey planes stacked vertically, as denseflow stores flow. The JPEG codec is a Zarr v3
array->bytes codec named "vidistill.jpeg", registered on import, so any Zarr reader that imports
this module reads the arrays (a plain Zarr reader without it refuses them with the codec's name).
The writer (cache/shards.py) encodes with the same object Zarr decodes with: the two never disagree.
"""
from dataclasses import dataclass

import imagecodecs
import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.codecs import BloscCodec, BytesCodec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.registry import register_codec

CODECS = ("jpeg", "zstd")
JPEG_CODEC_NAME = "vidistill.jpeg"


def storage_description(codecs):
    """{array: "jpeg q90" | "zstd"} for {array: (codec, quality)}: what the fingerprint records."""
    return {name: f"{codec} q{quality}" if codec == "jpeg" else codec for name, (codec, quality) in codecs.items()}


def jpeg_encode(chunk, quality):
    """uint8 [1, H, W, C] -> JPEG bytes (C = 3: one colour image; else C grey planes stacked)."""
    frame = chunk[0]
    if frame.shape[-1] == 3:
        # 4:2:0 chroma, as every camera and mp4 stores colour: the eye (and a CNN) sees luma detail
        return imagecodecs.jpeg8_encode(np.ascontiguousarray(frame), level=quality)
    planes = np.ascontiguousarray(frame.transpose(2, 0, 1).reshape(-1, frame.shape[1]))
    return imagecodecs.jpeg8_encode(planes, level=quality)


def jpeg_decode(data, shape):
    """JPEG bytes -> uint8 array of `shape` ([1, H, W, C])."""
    image = imagecodecs.jpeg8_decode(data)
    _, h, w, c = shape
    if c == 3:
        return image.reshape(shape)
    return image.reshape(c, h, w).transpose(1, 2, 0).reshape(shape)


@dataclass(frozen=True)
class JpegCodec(ArrayBytesCodec):
    """Zarr v3 codec: one uint8 frame chunk <-> a JPEG stream (libjpeg-turbo via imagecodecs)."""

    is_fixed_size = False
    quality: int = 90

    @classmethod
    def from_dict(cls, data):
        return cls(**data.get("configuration", {}))

    def to_dict(self):
        return {"name": JPEG_CODEC_NAME, "configuration": {"quality": self.quality}}

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec) -> NDBuffer:
        array = jpeg_decode(chunk_bytes.as_numpy_array().tobytes(), chunk_spec.shape)
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(array)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec) -> Buffer:
        data = jpeg_encode(chunk_array.as_numpy_array(), self.quality)
        return chunk_spec.prototype.buffer.from_bytes(data)

    def compute_encoded_size(self, input_byte_length, chunk_spec):
        raise NotImplementedError  # variable size


register_codec(JPEG_CODEC_NAME, JpegCodec)


def chunk_codecs(codec, quality, dtype="uint8"):
    """(serializer, compressors) of an array's inner chunks for a codec name."""
    if codec == "jpeg":
        return JpegCodec(quality=quality), ()
    if codec == "zstd":
        blosc = BloscCodec(cname="zstd", clevel=3, shuffle=_shuffle(dtype), typesize=np.dtype(dtype).itemsize)
        return BytesCodec(), (blosc,)
    raise ValueError(f"unknown codec {codec!r}; known: {', '.join(CODECS)}")


def _shuffle(dtype):
    # byte-shuffle helps multi-byte types (fp16 logits); it is a no-op cost for uint8 pixels
    return "shuffle" if np.dtype(dtype).itemsize > 1 else "noshuffle"


def encode_chunk(chunk, codec, quality):
    """Bytes of one inner chunk exactly as Zarr stores it with chunk_codecs(codec, quality, chunk.dtype)."""
    if codec == "jpeg":
        return jpeg_encode(chunk, quality)
    import numcodecs  # the Blosc that zarr's BloscCodec runs
    shuffle = numcodecs.Blosc.SHUFFLE if chunk.dtype.itemsize > 1 else numcodecs.Blosc.NOSHUFFLE
    return numcodecs.Blosc(cname="zstd", clevel=3, shuffle=shuffle).encode(np.ascontiguousarray(chunk))


def decode_chunk(data, codec, shape, dtype):
    """The inverse of encode_chunk: the chunk's rows, [shape] of dtype."""
    if codec == "jpeg":
        return jpeg_decode(data, shape)
    import numcodecs
    return np.frombuffer(numcodecs.Blosc().decode(data), dtype=dtype).reshape(shape)
