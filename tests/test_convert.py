"""The webdataset converter (`python -m jest_jax.data.convert`): shards, uid files, bad
members and tars, input errors before any work; and the acceptance run end to end through
the command line (convert, cut a uid subset, train a reference and a JEST learner,
zero-shot and multi-caption retrieval checked against NumPy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader
from tensorflow_datasets.core import example_parser
from wds_shards import FORMATS, encode, record_members, uid, write_tar

from jest_jax.data import convert, webdataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCK = 512


def _image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (18 + seed % 5, 20, 3), dtype=np.uint8)


def _offsets(members: list[tuple[str, bytes]]) -> list[int]:
    """Where each member's data starts in a ustar tar: a 512-byte header before each,
    data padded to 512 bytes (the format's layout, computed independently of tarfile)."""
    out, pos = [], 0
    for _, data in members:
        out.append(pos + BLOCK)
        pos += BLOCK + -(-len(data) // BLOCK) * BLOCK
    return out


def _read_shard(path: str, fields: dict[str, str]) -> list[dict]:
    features = webdataset.features_for(fields)
    parser = example_parser.ExampleParserNp(features.get_serialized_info())
    reader = ArrayRecordReader(path)
    try:
        raw = reader.read_all()
    finally:
        reader.close()
    return [features.decode_example_np(parser.parse_example(r)) for r in raw]


def _good(n: int, meta: dict | None = None) -> tuple[list, bytes, str]:
    ext, fmt = FORMATS[n % 3]
    image = encode(_image(n), fmt)
    meta = {"uid": uid(n), "score": n / 8, "label": n % 4, "url": f"http://x/{n}",
            "error_message": None} if meta is None else meta
    return record_members(f"{n:09d}", image, ext, f"caption {n}", meta), image, uid(n)


def test_expand_braces_and_list_shards(tmp_path):
    assert webdataset.expand_braces("d/{008..011}.tar") == [
        "d/008.tar", "d/009.tar", "d/010.tar", "d/011.tar"]
    assert webdataset.expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    for i in range(3):
        (tmp_path / f"{i:06d}.tar").write_bytes(b"x")
    names = [str(tmp_path / f"{i:06d}.tar") for i in range(3)]
    assert webdataset.list_shards(str(tmp_path / "{000000..000002}.tar")) == names
    assert webdataset.list_shards(str(tmp_path / "*.tar")) == names
    (tmp_path / "list.txt").write_text("\n".join(names[::-1]) + "\n")
    assert webdataset.list_shards(f"@{tmp_path / 'list.txt'}") == names[::-1]
    with pytest.raises(webdataset.InputError, match="2 of 5 files do not exist"):
        webdataset.list_shards(str(tmp_path / "{000000..000004}.tar"))


def test_uid_files_in_every_format(tmp_path):
    uids = [uid(i) for i in (5, 1, 9)]
    (tmp_path / "u.txt").write_text("\n".join(uids) + "\n\n")
    np.save(tmp_path / "s.npy", np.array(uids))
    # DataComp's subset file, written as its README says.
    pairs = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8"))
    pairs.sort()
    np.save(tmp_path / "datacomp.npy", pairs)
    pairs.tofile(tmp_path / "datacomp.mmap")  # its memory-mapped variant: no header
    for name in ("u.txt", "s.npy", "datacomp.npy", "datacomp.mmap"):
        assert webdataset.read_uids(str(tmp_path / name)) == set(uids), name


def test_convert_shard_keeps_bytes_and_counts_bad_members(tmp_path):
    members, expected = [], {}
    for n in range(9):
        m, image, u = _good(n)
        if n == 2:  # undecodable image
            m = record_members(f"{n:09d}", b"\xff\xd8 not a jpeg" * 4, "jpg", "c", {"uid": u})
        elif n == 4:  # no caption
            m = [x for x in m if not x[0].endswith(".txt")]
        elif n == 5:  # no image
            m = [x for x in m if not x[0].endswith(("jpg", "png", "webp"))]
        elif n == 7:  # json that does not parse
            m = [(k, b"{broken" if k.endswith(".json") else v) for k, v in m]
        else:
            expected[u] = image
        members += m
    write_tar(str(tmp_path / "a.tar"), members)
    stats = webdataset.convert_shard(str(tmp_path / "a.tar"), str(tmp_path / "a.ar"), None, None)
    assert stats.records == 5 and stats.truncated is None
    assert dict(stats.skipped) == {"undecodable image": 1, "missing caption": 1,
                                   "missing image": 1, "broken json": 1}
    # Scalar json fields are typed by their values; nulls are not stored.
    assert stats.fields == {"score": {"float32": 5}, "label": {"int64": 5},
                            "url": {"string": 5}}
    rows = _read_shard(str(tmp_path / "a.ar"), {"score": "float32", "label": "int64"})
    assert [r["uid"].decode() for r in rows] == list(expected)  # tar order
    for row in rows:
        assert row["image"] == expected[row["uid"].decode()]  # the member's bytes
        n = int(row["caption"].decode().split()[1])
        assert row["score"] == np.float32(n / 8) and row["label"] == n % 4

    # A uid subset, and an explicit field list (a record without the field is skipped).
    keep = frozenset([uid(0), uid(6), "f" * 32])
    stats = webdataset.convert_shard(str(tmp_path / "a.tar"), str(tmp_path / "b.ar"), keep,
                                     ("label",))
    # Records outside the subset are dropped before any check: bad ones too.
    assert stats.records == 2 and stats.filtered == 7 and not stats.skipped
    assert stats.fields == {"label": {"int64": 2}}
    stats = webdataset.convert_shard(str(tmp_path / "a.tar"), str(tmp_path / "c.ar"), None,
                                     ("nope",))
    assert stats.records == 0 and stats.skipped["missing json field"] == 5


def test_truncated_and_broken_tars(tmp_path):
    members, uids = [], []
    for n in range(6):
        m, _, u = _good(n)
        members += m
        uids.append(u)
    offsets = _offsets(members)
    per = len(members) // 6  # members per record
    # Cut in the middle of record 4's first member: records 0-3 survive, 4 is lost.
    cut = offsets[4 * per] + 10
    write_tar(str(tmp_path / "mid.tar"), members, truncate_to=cut)
    # Cut exactly before record 3's header: no end-of-archive blocks.
    write_tar(str(tmp_path / "edge.tar"), members, truncate_to=offsets[3 * per] - BLOCK)
    # Record 2's first header overwritten: tarfile stops there without an error.
    write_tar(str(tmp_path / "broken.tar"), members)
    with open(tmp_path / "broken.tar", "r+b") as f:
        f.seek(offsets[2 * per] - BLOCK)
        f.write(b"\x01" * BLOCK)
    for name, kept, reason, words in (
            ("mid", 4, "truncated tar", "unexpected end of data"),
            ("edge", 2, "truncated tar", "no end-of-archive blocks"),
            ("broken", 2, "broken tar entry", "does not parse")):
        stats = webdataset.convert_shard(str(tmp_path / f"{name}.tar"),
                                         str(tmp_path / f"{name}.ar"), None, None)
        assert stats.records == kept and dict(stats.skipped) == {reason: 1}, name
        assert words in stats.truncated
        rows = _read_shard(str(tmp_path / f"{name}.ar"), {})
        assert [r["uid"].decode() for r in rows] == uids[:kept]


def test_progress_line():
    stats = [webdataset.ShardStats("a.tar", "a", records=90, filtered=6),
             webdataset.ShardStats("b.tar", "b", records=100)]
    stats[0].skipped["missing caption"] = 4
    # 200 samples read in 20 s; 2 of 10 shards in 20 s: 80 s to go.
    assert convert.progress_line(stats, 10, 20.0) == "shards 2/10 done, 10 examples/s, ETA 80s"


def _cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jest_jax.data.convert", "webdataset", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, **(env or {})})


def _error(capsys, args: list[str]) -> str:
    assert convert.main(["webdataset", *args]) == 2
    return capsys.readouterr().err


def test_input_errors_before_any_work(tmp_path, capsys):
    tars = tmp_path / "tars"
    tars.mkdir()
    write_tar(str(tars / "000000.tar"), _good(0)[0])
    out = tmp_path / "out"
    base = ["--data_dir", str(out), "--name", "pool", "--split", "raw"]
    ok = ["--input", str(tars / "000000.tar")]
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "junk.bin").write_bytes(b"\xff\xfe\x00" * 7)  # not text, not 16-byte pairs
    for args, message in (
            (["--input", str(tars / "{000001..000009}.tar"), *base],
             "matches nothing: none of its 9 file(s) exist"),
            (["--input", str(tars / "*.tgz"), *base], "matches nothing: no tar files"),
            (["--input", f"@{tmp_path / 'empty.txt'}", *base], "the shard list"),
            ([*ok, *base, "--uids", str(tmp_path / "missing.txt")], "cannot read the uid file"),
            ([*ok, *base, "--uids", str(tmp_path / "junk.bin")], "neither text"),
            ([*ok, *base, "--uids", str(tmp_path / "empty.txt")], "holds no uids"),
            ([*ok, *base, "--json_fields", "uid,score"], "['uid'] are always stored"),
            ([*ok, "--data_dir", str(out), "--name", "Pool", "--split", "raw"],
             "must be snake_case")):
        assert message in _error(capsys, args)
        assert not out.exists(), message  # nothing written, not even the work dir
    (out / "pool" / "1.0.0").mkdir(parents=True)
    assert "already exists" in _error(capsys, [*ok, *base])
    assert os.listdir(out / "pool") == ["1.0.0"]


def _webdataset(root) -> dict:
    """The acceptance test's shards: a pool of 3 tars (JPEG, PNG and WebP members, a json
    per record with uid, score and label; an undecodable image in tar 0, a record without
    caption in tar 1, tar 2 cut in the middle of record 40's image) and an eval tar of 16
    images with 1-3 caption records each, grouped by `image_id`, labels in 8 classes."""
    root.mkdir()
    images, kept = {}, []
    for t in range(3):
        members = []
        for n in range(t * 16, t * 16 + 16):
            m, image, u = _good(n)
            if n == 3:
                m = record_members(f"{n:09d}", b"GIF89a\x00junk", "png", "c", {"uid": u})
            elif n == 21:
                m = [x for x in m if not x[0].endswith(".txt")]
            elif n < 40:
                images[u] = image
                kept.append(u)
            members += m
        cut = _offsets(members)[8 * 3] + 20 if t == 2 else None  # record 40's first member
        write_tar(str(root / f"{t:06d}.tar"), members, truncate_to=cut)
    members, captions = [], []
    for i in range(16):
        ext, fmt = FORMATS[i % 3]
        image = encode(_image(100 + i), fmt)
        for j in range(1 + i % 3):
            captions.append((i, f"image {i} caption {j}"))
            members += record_members(
                f"e{i:04d}{j}", image, ext, captions[-1][1],
                {"uid": uid(1000 + 10 * i + j), "image_id": 100 + i, "label": i % 8})
    write_tar(str(root / "eval.tar"), members)
    return dict(images=images, kept=kept, captions=captions)


def _main(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jest_jax.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
def test_webdataset_to_jest_end_to_end(tmp_path):
    import jax

    from conftest import train_state
    from jest_jax import build
    from jest_jax import config as config_lib
    from jest_jax.data import load_split

    shards = _webdataset(tmp_path / "shards")
    data = str(tmp_path / "tfds")
    pool_args = ["--input", str(tmp_path / "shards" / "{000000..000002}.tar"),
                 "--data_dir", data]
    result = _cli([*pool_args, "--name", "wds_pool", "--split", "raw", "--num_workers", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "converted 3 tar(s): 38 records stored, 3 skipped" in out
    assert "in 2 worker process(es)" in out
    for line in ("skipped      1: missing caption", "skipped      1: truncated tar",
                 "skipped      1: undecodable image"):
        assert line in out
    assert "000002.tar is truncated or broken (unexpected end of data)" in result.stderr
    assert "fields: image, caption, uid, label, score, url" in out
    source, info = load_split("wds_pool", "raw", data)
    assert info.splits["raw"].shard_lengths == [15, 15, 8]
    assert [source[i]["uid"].decode() for i in range(len(source))] == shards["kept"]
    for i in range(len(source)):
        assert source[i]["image"] == shards["images"][source[i]["uid"].decode()]

    # The curated subset: a DataComp subset file of every other kept uid (and one unknown).
    subset = sorted(shards["kept"][::2] + ["0" * 31 + "1"])
    pairs = np.array([(int(u[:16], 16), int(u[16:], 16)) for u in subset], np.dtype("u8,u8"))
    np.save(tmp_path / "subset.npy", pairs)
    result = _cli([*pool_args, "--name", "wds_curated", "--split", "curated",
                   "--uids", str(tmp_path / "subset.npy"), "--num_workers", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    curated, _ = load_split("wds_curated", "curated", data)
    assert [curated[i]["uid"].decode() for i in range(len(curated))] == shards["kept"][::2]
    # A uid file matching no record: an error, nothing written.
    (tmp_path / "none.txt").write_text("no-such-uid\n")
    result = _cli([*pool_args, "--name", "wds_none", "--split", "x", "--uids",
                   str(tmp_path / "none.txt"), "--num_workers", "1"])
    assert result.returncode == 2 and "matches no record of the 3 tar(s)" in result.stderr
    assert not os.path.exists(os.path.join(data, "wds_none", "1.0.0"))

    result = _cli(["--input", str(tmp_path / "shards" / "eval.tar"), "--data_dir", data,
                   "--name", "wds_eval", "--split", "test", "--num_workers", "1"])
    assert result.returncode == 0, result.stderr[-3000:]

    names = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    templates = ["a photo of {}.", "image {} here"]
    (tmp_path / "templates.txt").write_text("\n".join(templates) + "\n")
    # docs/data.md's commands, with the test's sizes and eval data.
    reference, learner = str(tmp_path / "reference"), str(tmp_path / "learner")
    base = (f"configs/webdataset.py:data_dir={data},pool=wds_pool,curated=wds_curated,"
            "model=tiny,batch=16,steps=4")
    evals = ["--config.selection.filter_ratio=0.5",  # 32 candidates: the pool has 38
             "--config.evals.imagenet.data.name=wds_eval",
             "--config.evals.imagenet.data.split=test",
             f"--config.evals.imagenet.data.data_dir={data}",
             f"--config.evals.imagenet.class_names={tmp_path / 'names.txt'}",
             f"--config.evals.imagenet.templates={tmp_path / 'templates.txt'}",
             "--config.evals.coco.data.name=wds_eval", "--config.evals.coco.data.split=test",
             f"--config.evals.coco.data.data_dir={data}", "--config.evals.coco.captions=",
             "--config.evals.coco.group_by=image_id"]
    result = _main(["--config", f"{base},stage=reference", "--workdir", reference,
                    *evals[1:]])
    assert result.returncode == 0, result.stderr[-3000:]
    learner_config = f"{base},stage=learner,reference={reference},cache={tmp_path / 'cache'}"
    result = _main(["--config", learner_config, "--mode", "cache", *evals])
    assert result.returncode == 0, result.stderr[-3000:]
    result = _main(["--config", learner_config, "--workdir", learner, *evals])
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.load(open(os.path.join(learner, "final_metrics.json")))
    assert final["step"] == 4

    # NumPy from the learner's checkpoint: image embeddings of the eval split as the
    # evaluator makes them; prompts embedded in one call, averaged in float64.
    config = config_lib.load(learner_config)
    config.selection.filter_ratio = 0.5
    for task, name in (("imagenet", "wds_eval"), ("coco", "wds_eval")):
        config.evals[task].data.update(dict(name=name, split="test", data_dir=data))
    config.evals.imagenet.class_names = (str(tmp_path / "names.txt"),)
    config.evals.imagenet.templates = (str(tmp_path / "templates.txt"),)
    config.evals.coco.captions, config.evals.coco.group_by = "", "image_id"
    run = build.build(config, selection=False)
    params = train_state(config, learner, 4)["params"]
    zero_shot = next(t for t in run.spec.evals.tasks if t.name == "imagenet")
    split = run.evaluator.context(params).split(zero_shot.data)
    image = split["image"].astype(np.float64)
    labels, groups = split["label"], split["image_id"]
    np.testing.assert_array_equal(groups, [100 + i for i, _ in shards["captions"]])
    tokens = np.stack([run.preprocess.tokenizer.encode(t.replace("{}", n), 24)
                       for n in names for t in templates])
    emb = np.asarray(jax.jit(run.model.embed_texts)(params, tokens), np.float64)
    emb = emb.reshape(len(names), len(templates), -1).mean(axis=1)
    class_emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
    logits = image @ class_emb.T
    for row, y in zip(logits, labels, strict=True):
        gap = np.min(np.abs(np.delete(row, y) - row[y]))
        assert gap > 1e-5, "a near-tie: float32 rounding could decide this rank"
    ranks = np.array([np.sum(row > row[y]) for row, y in zip(logits, labels, strict=True)])
    per_class = [np.mean(ranks[labels == c] == 0) for c in range(len(names))]
    assert final["imagenet/label"] == pytest.approx(np.mean(ranks == 0))
    assert final["imagenet/label_top5"] == pytest.approx(np.mean(ranks < 5))
    assert final["imagenet/label_mean_per_class"] == pytest.approx(np.mean(per_class))

    # Retrieval: one image per image_id (its first record), every record a caption.
    text = split["text"].astype(np.float64)
    ids = sorted(set(groups.tolist()))
    first = [int(np.argmax(groups == g)) for g in ids]
    sim = image[first] @ text.T
    owner = np.array([ids.index(g) for g in groups])
    for k in (1, 5, 10):
        i2t = np.mean([np.any(owner[np.argsort(-sim[i])[:k]] == i) for i in range(len(ids))])
        t2i = np.mean([np.sum(sim[:, c] > sim[owner[c], c]) < k for c in range(len(owner))])
        assert final[f"coco/i2t_r{k}"] == pytest.approx(i2t)
        assert final[f"coco/t2i_r{k}"] == pytest.approx(t2i)
