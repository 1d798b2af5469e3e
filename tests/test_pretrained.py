"""Public SigLIP checkpoints (big_vision .npz): the import against an independent float64
forward pass, position-embedding resizing, the SigLIP text styles, and every bad input
refused with a message naming the problem, before training."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import scipy.ndimage
from bigvision_files import (
    TINY,
    flatten,
    image_embeddings,
    save_npz,
    sentencepiece_model,
    siglip_tree,
    text_embeddings,
)

from jest_jax import build
from jest_jax.data.tokenizer import make_tokenizer
from jest_jax.fields import ConfigError
from jest_jax.models import big_vision
from jest_jax.reference import pretrained_model

IMAGE, TEXT_LEN, VOCAB = 16, 8, 40
FIELDS = big_vision.Fields("model.init_from", "model.init_resize_posemb", "the test model")


def _import(path, image_size=IMAGE, text_len=TEXT_LEN, vocab=VOCAB, resize=False):
    model = pretrained_model("tiny/4", image_size, text_len, vocab)
    with big_vision.NpzCheckpoint(str(path), "model.init_from") as file:
        return model, file.params(model, FIELDS, resize)


def _inputs(seed=1, batch=3):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, IMAGE, IMAGE, 3), dtype=np.uint8)
    tokens = rng.integers(0, VOCAB, (batch, TEXT_LEN)).astype(np.int32)
    tokens[0, 4:] = 1  # a short caption: EOS, padded with EOS (SigLIP's c4-en style)
    return images, tokens


@pytest.mark.parametrize("stacked,prefix", [(False, "params/"), (True, "params/"),
                                            (False, "")])
def test_imported_embeddings_equal_a_float64_forward_pass(tmp_path, stacked, prefix):
    tree = siglip_tree(0, image_size=IMAGE, text_len=TEXT_LEN, vocab=VOCAB, stacked=stacked)
    path = save_npz(tmp_path / "siglip.npz", tree, prefix)
    model, params = _import(path)
    images, tokens = _inputs()
    emb = model.embeddings(params, {"image": images, "tokens": tokens})
    np.testing.assert_allclose(emb.image, image_embeddings(tree, images), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(emb.text, text_embeddings(tree, tokens), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.exp(emb.log_temperature), np.exp(tree["t"][0]), rtol=1e-6)
    assert float(emb.bias) == float(tree["b"][0])


def test_bfloat16_files_are_read(tmp_path):
    import ml_dtypes

    tree = siglip_tree(2, image_size=IMAGE, text_len=TEXT_LEN, vocab=VOCAB)
    flat = {k: v.astype(ml_dtypes.bfloat16) for k, v in flatten(tree).items()}
    np.savez(tmp_path / "bf16.npz", **{f"params/{k}": v for k, v in flat.items()})
    _, params = _import(tmp_path / "bf16.npz")
    expected = flat["img/embedding/kernel"].astype(np.float32)
    np.testing.assert_array_equal(params["image"]["patch_kernel"], expected)


def test_position_embeddings_resize_to_another_image_size(tmp_path):
    tree = siglip_tree(3, image_size=IMAGE, text_len=TEXT_LEN, vocab=VOCAB)
    path = save_npz(tmp_path / "siglip.npz", tree)
    with pytest.raises(ConfigError, match=r"config.data.image_size=32 is invalid: .*trained at "
                       r"16 px \(4x4 patches of 4\).*model.init_resize_posemb=True"):
        _import(path, image_size=32)
    # big_vision resizes by scipy.ndimage.zoom(order=1): corner-aligned, not antialiased
    old = tree["img"]["pos_embedding"][0].reshape(4, 4, -1).astype(np.float64)
    for image_size, grid in ((32, 8), (12, 3), (8, 2)):  # one upsample, two downsamples
        _, params = _import(path, image_size=image_size, resize=True)
        expected = scipy.ndimage.zoom(old, (grid / 4, grid / 4, 1), order=1)
        assert expected.shape == (grid, grid, old.shape[2])
        np.testing.assert_allclose(params["image"]["pos_embedding"], expected, atol=1e-6)
    # The text length must be the checkpoint's: a shorter one would pool at another
    # position (the last) than the published model, a longer one has no embeddings.
    for text_len in (5, 9):
        with pytest.raises(ConfigError, match=rf"config.data.text_len={text_len} is invalid: "
                           r".* for 8 tokens.*set data.text_len=8"):
            _import(path, text_len=text_len)


def test_bad_checkpoints_are_named(tmp_path):
    tree = siglip_tree(4, image_size=IMAGE, text_len=TEXT_LEN, vocab=VOCAB)
    good = save_npz(tmp_path / "good.npz", tree)
    # another variant: a wider model
    wide = siglip_tree(4, image_size=IMAGE, text_len=TEXT_LEN, vocab=VOCAB,
                       size={**TINY, "width": 32, "num_heads": 2})
    with pytest.raises(ConfigError, match=r"parameter 'img/embedding/kernel' has shape "
                       r"\[4, 4, 3, 32\] but the model of the test model needs \[4, 4, 3, 64\]"
                       r".*another variant"):
        _import(save_npz(tmp_path / "wide.npz", wide))
    # another patch size
    with pytest.raises(ConfigError, match="img/embedding/kernel"):
        model = pretrained_model("tiny/8", IMAGE, TEXT_LEN, VOCAB)
        with big_vision.NpzCheckpoint(good, "model.init_from") as f:
            f.check(model, FIELDS, False)
    # deeper: a block the model does not have
    deep = siglip_tree(4, image_size=IMAGE, text_len=TEXT_LEN, vocab=VOCAB,
                       size={**TINY, "depth": 3})
    with pytest.raises(ConfigError, match=r"has parameters the model of the test model lacks "
                                          r"\(img/Transformer/encoderblock_2/"):
        _import(save_npz(tmp_path / "deep.npz", deep))
    # no text head: SigLIP's multilingual So400m/16 file
    headless = siglip_tree(4, image_size=IMAGE, text_len=TEXT_LEN, vocab=VOCAB)
    del headless["txt"]["head"]
    with pytest.raises(ConfigError, match=r"checkpoint has no text head \('txt/head/"):
        _import(save_npz(tmp_path / "headless.npz", headless))
    # a missing key
    del tree["txt"]["Encoder_0"]["encoderblock_1"]["MlpBlock_0"]["Dense_1"]["bias"]
    with pytest.raises(ConfigError, match=r"has no parameter "
                       r"'txt/Encoder_0/encoderblock_1/MlpBlock_0/Dense_1/bias'"):
        _import(save_npz(tmp_path / "missing.npz", tree))
    # truncated, not a zip, a single np.save array, no file
    data = open(good, "rb").read()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.npz").write_text("not a checkpoint")
    np.save(tmp_path / "one.npy", np.zeros(3))
    for name in ("cut.npz", "text.npz", "one.npy"):
        with pytest.raises(ConfigError, match=r"config.model.init_from=.* is not a readable "
                                              r"\.npz checkpoint"):
            _import(tmp_path / name)
    with pytest.raises(ConfigError, match="no such file"):
        _import(tmp_path / "absent.npz")
    with pytest.raises(ConfigError, match=r"init_from=.* is a directory, not a \.npz"):
        _import(tmp_path)
    # a vocabulary of another size
    with pytest.raises(ConfigError, match=r"config.data.tokenizer is invalid: it has a "
                                          r"vocabulary of 41 ids but .* embeds 40"):
        _import(good, vocab=41)


def test_siglip_text_styles(tmp_path):
    words = "a red square above the blue circle small large green triangle École école".split()
    path = sentencepiece_model(tmp_path, words)
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=path)
    ids = sp.encode("a red square")
    eos, pad = sp.eos_id(), sp.pad_id()
    assert (eos, pad) == (1, 0)
    siglip, siglip2 = make_tokenizer(path, "siglip"), make_tokenizer(path, "siglip2")
    assert siglip.vocab_size == siglip2.vocab_size == sp.get_piece_size()
    assert make_tokenizer(path).vocab_size == sp.get_piece_size() + 1  # "jest": shifted
    n = len(ids)
    # lower-cased, the model's own ids, EOS, then EOS (siglip) or pad (siglip2) padding
    np.testing.assert_array_equal(siglip.encode("A Red SQUARE", n + 3), ids + [eos] * 3)
    np.testing.assert_array_equal(siglip2.encode(b"A Red SQUARE", n + 3),
                                  ids + [eos] + [pad] * 2)
    # only ASCII letters are lower-cased, as big_vision's tf.strings.lower
    upper, lower = sp.encode("École red"), sp.encode("école red")
    assert upper != lower  # the vocabulary tells É from é, so the check below can fail
    np.testing.assert_array_equal(siglip.encode("ÉCOLE Red", len(upper) + 2),
                                  upper + [eos] * 2)
    # truncation keeps the EOS last ("sticky")
    np.testing.assert_array_equal(siglip.encode("a red square", 2), ids[:1] + [eos])
    with pytest.raises(ValueError, match="needs a SentencePiece model"):
        make_tokenizer("bytes", "siglip")


def _init_config(tiny_config, path, tokenizer):
    config = tiny_config
    config.model.update(big_vision.variant_fields("tiny/4"))
    config.model.init_from = path
    config.data.tokenizer = tokenizer
    config.data.text_style = "siglip"
    config.data.text_len = TEXT_LEN
    return config


def test_init_from_errors_come_before_training(tiny_config, tmp_path):
    words = "a red square above the blue circle small large green triangle".split()
    sp = sentencepiece_model(tmp_path, words)
    vocab = make_tokenizer(sp, "siglip").vocab_size
    tree = siglip_tree(5, image_size=16, text_len=TEXT_LEN, vocab=vocab + 1)
    config = _init_config(tiny_config, save_npz(tmp_path / "c.npz", tree), sp)
    with pytest.raises(ConfigError, match=r"config.data.tokenizer is invalid: it has a "
                                          rf"vocabulary of {vocab} ids .* embeds {vocab + 1}"):
        build.build(config)
    tree = siglip_tree(5, image_size=16, text_len=TEXT_LEN - 2, vocab=vocab)
    config.model.init_from = save_npz(tmp_path / "short.npz", tree)
    with pytest.raises(ConfigError, match=rf"config.data.text_len={TEXT_LEN} is invalid"):
        build.build(config)
    config.model.init_from = str(tmp_path / "absent.npz")
    with pytest.raises(ConfigError, match="config.model.init_from=.*no such file"):
        build.build(config)
    assert not os.path.exists(tmp_path / "checkpoints")


def test_reference_checkpoint_fields_are_checked(tiny_config, tmp_path):
    jest_config = tiny_config
    jest_config.selection.method = "joint"
    jest_config.selection.filter_ratio = 0.5
    jest_config.selection.reference.checkpoint = str(tmp_path / "x.npz")
    jest_config.selection.reference.variant = "Huge/16"
    from jest_jax import config as config_lib

    with pytest.raises(ConfigError, match=r"config.selection.reference.variant='Huge/16' is "
                                          r"invalid: must be '<size>/<patch size>'"):
        config_lib.validate(jest_config)
    jest_config.selection.reference.variant = "tiny/4"
    with pytest.raises(ConfigError, match=r"selection.reference.checkpoint=.* is not a file"):
        config_lib.validate(jest_config)
    jest_config.selection.reference.workdir = str(tmp_path)
    with pytest.raises(ConfigError, match="not both"):
        config_lib.validate(jest_config)


def test_a_replaced_reference_file_is_another_identity(tiny_config, tmp_path):
    from jest_jax import config as config_lib

    tree = siglip_tree(5, image_size=IMAGE, text_len=TEXT_LEN, vocab=VOCAB)
    path = save_npz(tmp_path / "ref.npz", tree)
    tiny_config.selection.method, tiny_config.selection.filter_ratio = "joint", 0.5
    tiny_config.selection.reference.update(dict(checkpoint=path, variant="tiny/4"))
    spec = config_lib.validate(tiny_config).reference
    before = spec.checkpoint_identity()
    assert before["size"] == os.path.getsize(path)
    assert spec.checkpoint_identity() == before  # the same file: the same identity
    # Replaced by another file of the same size at the same path: only its time differs.
    save_npz(tmp_path / "ref.npz", siglip_tree(6, image_size=IMAGE, text_len=TEXT_LEN,
                                               vocab=VOCAB))
    os.utime(path, ns=(before["mtime_ns"] + 10**9, before["mtime_ns"] + 10**9))
    after = spec.checkpoint_identity()
    assert after["size"] == before["size"] and after != before
    # A file of another size.
    save_npz(tmp_path / "ref.npz", siglip_tree(6, image_size=IMAGE, text_len=TEXT_LEN,
                                               vocab=VOCAB + 1))
    os.utime(path, ns=(before["mtime_ns"], before["mtime_ns"]))
    assert spec.checkpoint_identity()["size"] != before["size"]


def test_published_variants_are_selectable():
    from jest_jax.models import VARIANTS

    assert VARIANTS["So400m"] == dict(width=1152, depth=27, num_heads=16, mlp_dim=4304)
    for name in big_vision.PUBLISHED:
        fields = big_vision.variant_fields(name)
        size, patch = name.split("/")
        assert fields["image_variant"] == fields["text_variant"] == size
        assert fields["patch_size"] == int(patch)
        assert fields["embed_dim"] == VARIANTS[size]["width"]
        assert not fields["image_head"] and fields["text_pool"] == "last"


# Parameter counts of the published SigLIP checkpoints with the c4-en 32k vocabulary
# (B/16 203M, L/16 652M, So400m/14 878M): the variants have their sizes.
PUBLISHED_PARAMS_M = {"B/16": 203.2, "L/16": 652.1, "So400m/14": 877.4}


# Building the abstract model of the large towers takes tens of seconds on 2 cores.
# (L/16 is the paper config's L/16 less its image head, counted in test_paper_configs.py.)
@pytest.mark.parametrize("variant", ["B/16", pytest.param("So400m/14", marks=pytest.mark.slow)])
def test_siglip_config_builds_the_published_sizes(variant):
    import jax

    from conftest import load_config
    from jest_jax import config as config_lib
    from jest_jax.models import Model

    specs = {role: config_lib.validate(load_config(
        "siglip.py", f"role={role},variant={variant},checkpoint=x.npz,tokenizer=x.model"),
        check_files=False) for role in ("finetune", "jest")}
    params = Model(specs["finetune"].model, vocab_size=32_000).abstract_params()
    count = sum(x.size for x in jax.tree.leaves(params)) / 1e6
    assert count == pytest.approx(PUBLISHED_PARAMS_M[variant], rel=0.005)
    assert specs["finetune"].model.init_from == "x.npz"
    assert (specs["jest"].reference.checkpoint, specs["jest"].reference.variant) == (
        "x.npz", variant)
    assert specs["jest"].model == dataclasses.replace(specs["finetune"].model, init_from="",
                                                              init_resize_posemb=False)


def test_siglip_config_resizes_only_when_asked():
    from conftest import load_config

    base = "variant=B/16,checkpoint=x.npz,tokenizer=x.model"
    for resize in (False, True):
        arg = base + (",resize=True" if resize else "")
        finetune = load_config("siglip.py", f"role=finetune,{arg}")
        jest = load_config("siglip.py", f"role=jest,{arg}")
        assert finetune.model.init_resize_posemb is resize
        assert jest.selection.reference.resize_posemb is resize
        assert jest.model.init_resize_posemb is False  # the learner starts from scratch


def test_embed_mode_with_a_workdir_checkpoint(reference_workdir, data_dir, tmp_path):
    import json

    import jax

    from conftest import load_config
    from jest_jax import config as config_lib
    from jest_jax import train
    from jest_jax.checkpoint import Checkpointer
    from jest_jax.data import sources

    config = load_config("smoke.py", "steps=10")
    for pool in (config.data.train, config.evals.zero_shot.data, config.evals.retrieval.data):
        pool.data_dir = data_dir
    config.batch_size = config.evals.batch_size = 32
    for bad, why in (("data.nope", "names no field"), ("data.image_size", "must name a pool")):
        config.embed.pool = bad
        with pytest.raises(ConfigError, match=rf"config.embed.pool='{bad}' is invalid: {why}"):
            config_lib.validate(config)
    config.embed.pool = "evals.retrieval.data"
    with pytest.raises(FileNotFoundError, match="nothing to embed with: .* has no checkpoint "
                                                "and config.model.init_from is empty"):
        train.embed(config, str(tmp_path / "empty"), str(tmp_path / "none"))
    assert not os.path.exists(tmp_path / "empty") and not os.path.exists(tmp_path / "none")
    # .npy memory maps cannot go to a bucket: refused before anything is built or written.
    with pytest.raises(ConfigError, match=r"--output 'gs://b/emb' is a URL: --mode embed "
                                          r"writes \.npy memory maps to a local directory"):
        train.embed(config, reference_workdir, "gs://b/emb")
    assert not os.path.exists("gs:")
    out = tmp_path / "emb"
    train.embed(config, reference_workdir, str(out))
    meta = json.load(open(out / "meta.json"))
    assert meta["model"] == f"step 10 of {os.path.realpath(reference_workdir)}"
    assert meta["pool"] == "evals.retrieval.data" and meta["data"] == "jest_shapes/tiny:eval"
    # The rows are the checkpoint's embeddings of the records, in order.
    run = build.build(config, selection=False)
    checkpointer = Checkpointer(reference_workdir)
    try:
        params = checkpointer.restore_params(run.state.abstract_params(), 10)
    finally:
        checkpointer.close()
    pool = sources.open_pool(config, "evals.retrieval.data")
    rows = [run.preprocess(pool[i], i) for i in (0, 5, len(pool) - 1)]
    emb = run.model.embeddings(params, {k: np.stack([r[k] for r in rows])
                                        for k in ("image", "tokens")})
    image, text = np.load(out / "image.npy"), np.load(out / "text.npy")
    assert len(image) == len(pool)
    np.testing.assert_allclose(image[[0, 5, len(pool) - 1]], emb.image, atol=2e-6)
    np.testing.assert_allclose(text[[0, 5, len(pool) - 1]], emb.text, atol=2e-6)
    np.testing.assert_allclose(np.load(out / "logit_scale.npy"),
                               np.exp(jax.device_get(params["log_temperature"])), rtol=1e-6)


def test_a_headless_image_tower_needs_embed_dim_equal_to_its_width(tiny_config):
    from jest_jax import config as config_lib

    tiny_config.model.image_head = False
    tiny_config.model.embed_dim = 32
    with pytest.raises(ConfigError, match=r"config.model.embed_dim=32 is invalid: must be the "
                                          r"image width 64 of image_variant='tiny'"):
        config_lib.validate(tiny_config)
