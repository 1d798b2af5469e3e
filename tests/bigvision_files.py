"""Test helpers: big_vision SigLIP checkpoints written the way the published ones are, and
an independent float64 NumPy forward pass of that architecture, from the math.

The parameter tree has big_vision's key names and shapes (its ViT with a MAP head and no
image head, its text transformer with a head, `t` and `b`), random values, and is saved
with `numpy.savez` under '/'-joined keys prefixed `params/`. Nothing here imports
jest_jax's models, so the forward pass checks the import from outside.
"""

from __future__ import annotations

import numpy as np

TINY = dict(width=64, depth=2, num_heads=2, mlp_dim=256)  # jest_jax's "tiny" size


def _block(rng, width: int, heads: int, mlp: int, scale: float) -> dict:
    d = width // heads
    n = lambda *s: rng.normal(0, scale, s)  # noqa: E731
    attn = {name: {"kernel": n(width, heads, d), "bias": n(heads, d)}
            for name in ("query", "key", "value")}
    attn["out"] = {"kernel": n(heads, d, width), "bias": n(width)}
    return {
        "LayerNorm_0": {"scale": 1 + n(width), "bias": n(width)},
        "MultiHeadDotProductAttention_0": attn,
        "LayerNorm_1": {"scale": 1 + n(width), "bias": n(width)},
        "MlpBlock_0": {"Dense_0": {"kernel": n(width, mlp), "bias": n(mlp)},
                       "Dense_1": {"kernel": n(mlp, width), "bias": n(width)}},
    }


def siglip_tree(seed: int = 0, *, image_size: int = 16, patch: int = 4, text_len: int = 8,
                vocab: int = 40, size: dict | None = None, stacked: bool = False,
                scale: float = 0.15) -> dict:
    """A random big_vision SigLIP two-tower parameter tree (nested dicts of float32)."""
    size = size or TINY
    rng = np.random.default_rng(seed)
    w, depth, heads, mlp = size["width"], size["depth"], size["num_heads"], size["mlp_dim"]
    n = lambda *s: rng.normal(0, scale, s)  # noqa: E731
    grid = image_size // patch

    def encoder() -> dict:
        blocks = [_block(rng, w, heads, mlp, scale) for _ in range(depth)]
        if stacked:  # big_vision's scan=True layout: one group, a leading depth axis
            out = {"encoderblock": _stack(blocks)}
        else:
            out = {f"encoderblock_{i}": b for i, b in enumerate(blocks)}
        out["encoder_norm"] = {"scale": 1 + n(w), "bias": n(w)}
        return out

    img = {
        "embedding": {"kernel": n(patch, patch, 3, w), "bias": n(w)},
        "pos_embedding": n(1, grid * grid, w),
        "Transformer": encoder(),
        "MAPHead_0": {"probe": n(1, 1, w), **{k: v for k, v in _block(
            rng, w, heads, mlp, scale).items() if k != "LayerNorm_1"}},
    }
    txt = {
        "Embed_0": {"embedding": n(vocab, w)},
        "pos_embedding": n(1, text_len, w),
        "Encoder_0": encoder(),
        "head": {"kernel": n(w, w), "bias": n(w)},
    }
    tree = {"img": img, "txt": txt, "t": np.array([np.log(10.0) + 0.3]), "b": np.array([-9.5])}
    return _map(lambda a: np.asarray(a, np.float32), tree)


def _stack(blocks: list[dict]) -> dict:
    if isinstance(blocks[0], dict):
        return {k: _stack([b[k] for b in blocks]) for k in blocks[0]}
    return np.stack(blocks)


def _map(fn, tree):
    return {k: _map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """'/'-joined keys, as big_vision flattens a tree for its .npz files."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def save_npz(path, tree: dict, prefix: str = "params/") -> str:
    np.savez(path, **{f"{prefix}{k}": v for k, v in flatten(tree).items()})
    return str(path)


# --- the forward pass, float64, from the math -----------------------------------------

def _ln(x, p, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):  # the tanh form (flax's and jax's default)
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _mha(q_in, kv_in, p):
    q = np.einsum("btw,whd->bthd", q_in, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("bsw,whd->bshd", kv_in, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("bsw,whd->bshd", kv_in, p["value"]["kernel"]) + p["value"]["bias"]
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshd->bthd", weights, v)
    return np.einsum("bthd,hdw->btw", out, p["out"]["kernel"]) + p["out"]["bias"]


def _mlp(x, p):
    return _gelu(x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]) @ p["Dense_1"]["kernel"] \
        + p["Dense_1"]["bias"]


def _encoder(x, enc):
    blocks = sorted((k for k in enc if k.startswith("encoderblock_")),
                    key=lambda k: int(k.split("_")[1]))
    if "encoderblock" in enc:
        depth = len(enc["encoderblock"]["LayerNorm_0"]["scale"])
        layers = [_map(lambda a, i=i: a[i], enc["encoderblock"]) for i in range(depth)]
    else:
        layers = [enc[k] for k in blocks]
    for p in layers:
        y = _ln(x, p["LayerNorm_0"])
        x = x + _mha(y, y, p["MultiHeadDotProductAttention_0"])
        x = x + _mlp(_ln(x, p["LayerNorm_1"]), p["MlpBlock_0"])
    return _ln(x, enc["encoder_norm"])


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def image_embeddings(tree: dict, images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] → unit [B, width]: patchify (a stride-p conv), position
    embeddings, pre-LN blocks, final LN, MAP pooling; SigLIP's image tower has no head."""
    p = _map(lambda a: np.asarray(a, np.float64), tree["img"])
    x = images.astype(np.float64) / 127.5 - 1
    b, h, w, c = x.shape
    k = p["embedding"]["kernel"]
    ps = k.shape[0]
    patches = x.reshape(b, h // ps, ps, w // ps, ps, c)
    x = np.einsum("biujvc,uvcd->bijd", patches, k) + p["embedding"]["bias"]
    x = x.reshape(b, -1, x.shape[-1]) + p["pos_embedding"]
    x = _encoder(x, p["Transformer"])
    head = p["MAPHead_0"]
    probe = np.broadcast_to(head["probe"], (b, 1, x.shape[-1]))
    y = _mha(probe, x, head["MultiHeadDotProductAttention_0"])
    y = y + _mlp(_ln(y, head["LayerNorm_0"]), head["MlpBlock_0"])
    return _unit(y[:, 0])


def text_embeddings(tree: dict, tokens: np.ndarray) -> np.ndarray:
    """int [B, L] → unit [B, D]: token and position embeddings, pre-LN blocks attending to
    every position, final LN, the last position, the head."""
    p = _map(lambda a: np.asarray(a, np.float64), tree["txt"])
    x = p["Embed_0"]["embedding"][tokens] + p["pos_embedding"][:, :tokens.shape[1]]
    x = _encoder(x, p["Encoder_0"])[:, -1]
    return _unit(x @ p["head"]["kernel"] + p["head"]["bias"])


def sigmoid_loss(image: np.ndarray, text: np.ndarray, scale: float, bias: float) -> float:
    """SigLIP's loss, float64: -Σ_ij log σ(z_ij (scale <x_i, y_j> + bias)) / b."""
    logits = scale * (image.astype(np.float64) @ text.astype(np.float64).T) + bias
    z = 2 * np.eye(len(image)) - 1
    return float(np.sum(np.logaddexp(0, -z * logits)) / len(image))


def sentencepiece_model(directory, words: list[str], vocab_size: int = 48) -> str:
    """A tiny SentencePiece model laid out like c4-en's and Gemma's first ids (pad 0,
    EOS 1, unk 2, no BOS), trained on text written here."""
    import sentencepiece

    text = directory / "corpus.txt"
    text.write_text("\n".join(" ".join(words[i:] + words[:i]) for i in range(len(words))) * 5)
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(directory / "sp"), vocab_size=vocab_size,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram",
        hard_vocab_limit=False, minloglevel=2)
    return str(directory / "sp.model")
