"""Which `jest_shapes` attributes does a run's model encode, and which survive tokenisation?

    # embeddings of the curated pool and of the eval split, by a run's latest checkpoint
    python -m jest_jax.main --config configs/shapes.py:stage=reference --workdir RUN \\
        --mode embed --output RUN/emb_curated
    python -m jest_jax.main --config configs/shapes.py:stage=reference --workdir RUN \\
        --mode embed --output RUN/emb_eval --config.embed.pool=evals.zero_shot.data
    python experiments/probe_attributes.py --train RUN/emb_curated --test RUN/emb_eval
    python experiments/probe_attributes.py --captions   # caption truncation only

A linear probe (multinomial logistic regression, full-batch gradient descent in NumPy
float64 on standardised features) per attribute and tower: trained on the first split's
frozen unit embeddings, scored on the second's. Chance is 1/6 (shape), 1/8 (colour), 1/3
(size) and 1/9 (position). A tower that encodes an attribute the probe reads well, while
zero-shot stays at chance, points at the other tower (docs/results.md, "The embedded
benchmark"). `--captions` prints how often the caption words naming each attribute
survive the byte tokenizer's cut at `text_len - 1` bytes.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jest_jax.data import shapes  # noqa: E402


def probe(x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray, steps: int = 500,
          lr: float = 2.0, weight_decay: float = 1e-4) -> float:
    """Test accuracy of a softmax regression fitted on (x, y)."""
    k = int(max(y.max(), yt.max())) + 1
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, xt = (x - mu) / sd, (xt - mu) / sd
    w, b, onehot = np.zeros((x.shape[1], k)), np.zeros(k), np.eye(k)[y]
    for _ in range(steps):
        z = x @ w + b
        p = np.exp(z - z.max(1, keepdims=True))
        g = (p / p.sum(1, keepdims=True) - onehot) / len(x)
        w -= lr * (x.T @ g + weight_decay * w)
        b -= lr * g.sum(0)
    return float(((xt @ w + b).argmax(1) == yt).mean())


def labels(split: str, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The attributes of the first `n` examples of a `jest_shapes` split (regenerated)."""
    rows = [shapes.generate_example(seed, split, i) for i in range(n)]
    return {a: np.array([r[a] for r in rows]) for a in shapes.ATTRIBUTES}


def caption_survival(cuts: tuple[int, ...] = (31, 47, 63), n: int = 3000) -> None:
    """For each attribute, the fraction of captions naming it whose naming words survive a
    cut at each byte length (the byte tokenizer keeps `text_len - 1` bytes)."""
    words = {"shape": shapes._SHAPE_WORDS, "color": shapes._COLOR_WORDS,
             "size": shapes._SIZE_WORDS, "position": shapes._POSITION_WORDS}
    rows = [shapes.generate_example(0, "curated", i) for i in range(n)]

    def names(text: str, attribute: str, row: dict) -> bool:
        phrases = words[attribute][shapes.ATTRIBUTES[attribute][row[attribute]]]
        # Tag-style captions drop the preposition ("upper left" for "in the upper left").
        return any(p in text or p.split(" ", 2)[-1] in text for p in phrases)

    for attribute in words:
        said = [(r["caption"].lower(), r) for r in rows if names(r["caption"].lower(),
                                                                  attribute, r)]
        kept = [np.mean([names(c[:cut], attribute, r) for c, r in said]) for cut in cuts]
        print(f"{attribute:9s} named in {len(said) / n:.2f} of captions; survives a cut at "
              + ", ".join(f"{cut} bytes: {k:.2f}" for cut, k in zip(cuts, kept, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", help="--mode embed output of the probe's training split")
    parser.add_argument("--test", help="--mode embed output of the eval split")
    parser.add_argument("--train-split", default="curated")
    parser.add_argument("--test-split", default="eval")
    parser.add_argument("--captions", action="store_true", help="caption truncation only")
    args = parser.parse_args()
    if args.captions or not args.train:
        caption_survival()
        return
    train = {k: np.load(os.path.join(args.train, f"{k}.npy")) for k in ("image", "text")}
    test = {k: np.load(os.path.join(args.test, f"{k}.npy")) for k in ("image", "text")}
    y, yt = (labels(args.train_split, len(train["image"])),
             labels(args.test_split, len(test["image"])))
    for tower in ("image", "text"):
        accs = {a: probe(train[tower], y[a], test[tower], yt[a]) for a in shapes.ATTRIBUTES}
        print(f"{tower:5s} probe " + " ".join(f"{a}={v:.3f}" for a, v in accs.items()),
              flush=True)


if __name__ == "__main__":
    main()
