"""Converting img2dataset/webdataset shards into a TFDS ArrayRecord dataset, with Beam.

    python -m jest_jax.data.convert webdataset --input 'DIR/{000000..000099}.tar' \\
        --data_dir D --name N --split S [--uids FILE] [--json_fields a,b] \\
        [--num_workers K] [--runner R ...Beam pipeline options]

One ArrayRecord shard per input tar, written in parallel by an Apache Beam pipeline
(locally the DirectRunner with K worker processes; Dataflow, Spark or Flink at scale),
into ``D/N/1.0.0/``: a dataset every part of jest_jax reads by name/split/data_dir.
docs/data.md ("Converting webdataset shards") describes the stored features, the
output layout and the bad-member policy. Needs the `beam` extra (`jest_jax[beam]`).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import sys
import threading
import time
from collections import Counter
from typing import Any

from etils import epath

from jest_jax import log
from jest_jax.data import webdataset
from jest_jax.data.webdataset import InputError, ShardStats

VERSION = "1.0.0"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")
_STATS = "_shard_stats"  # per-shard summaries, inside the unfinished output only
_INCOMPLETE = ".incomplete"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jest_jax.data.convert",
        description="Convert image-text shards into a TFDS ArrayRecord dataset (Apache Beam).")
    sub = parser.add_subparsers(dest="format", required=True)
    wds = sub.add_parser(
        "webdataset", help="img2dataset/webdataset tars: KEY.jpg|png|webp, KEY.txt, KEY.json",
        epilog="Other options go to Beam (e.g. --project, --region, --temp_location for "
               "Dataflow); see docs/data.md.")
    wds.add_argument("--input", required=True,
                     help="tar files: 'DIR/{000000..000099}.tar', a glob, or @FILE listing "
                          "one path per line (local or gs://)")
    wds.add_argument("--data_dir", required=True, help="where DATASET/1.0.0/ is written")
    wds.add_argument("--name", required=True, help="dataset name (snake_case)")
    wds.add_argument("--split", required=True, help="split name, e.g. raw or curated")
    wds.add_argument("--uids", help="keep only these uids: one per line, a .npy of strings, "
                                    "or a DataComp subset file ('u8,u8' uid pairs)")
    wds.add_argument("--json_fields", help="comma-separated json fields to store (default: "
                                           "every scalar field present in all records)")
    wds.add_argument("--num_workers", type=int, default=os.cpu_count() or 1,
                     help="DirectRunner worker processes (default: all cores)")
    wds.add_argument("--runner", default="DirectRunner", help="Beam runner")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, beam_args = _parser().parse_known_args(argv)
    try:
        plan = _plan(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stats = _run(plan, args, beam_args)
    try:
        _finish(plan, stats)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    """Every check that needs no conversion: all of them before any work starts."""
    if not _NAME_RE.match(args.name):
        raise InputError(f"--name {args.name!r} must be snake_case (lowercase letters, "
                         "digits, _)")
    if not _SPLIT_RE.match(args.split):
        raise InputError(f"--split {args.split!r} must be letters, digits or '_'")
    if args.num_workers < 1:
        raise InputError(f"--num_workers must be >= 1, got {args.num_workers}")
    json_fields = None
    if args.json_fields is not None:
        json_fields = tuple(f.strip() for f in args.json_fields.split(",") if f.strip())
        reserved = set(json_fields) & set(webdataset.RESERVED)
        if reserved:
            raise InputError(f"--json_fields: {sorted(reserved)} are always stored "
                             f"({', '.join(webdataset.RESERVED)}); list only json fields")
    final = epath.Path(args.data_dir) / args.name / VERSION
    if final.exists():
        raise InputError(f"output {final} already exists: delete it or choose another "
                         "--name or --data_dir")
    tars = webdataset.list_shards(args.input)
    uids = None
    if args.uids is not None:
        uids = webdataset.read_uids(args.uids)  # errors now, not in a worker
    try:
        import apache_beam  # noqa: F401  (an optional extra)
    except ImportError:
        raise InputError("the converter needs Apache Beam: pip install 'jest_jax[beam]'") from None
    work = final.parent / (VERSION + _INCOMPLETE)
    if work.exists():  # a run that died: its shards are not trusted
        work.rmtree()
    (work / _STATS).mkdir(parents=True)
    return dict(final=final, work=work, tars=tars, uids=uids, json_fields=json_fields,
                name=args.name, split=args.split, uid_file=args.uids)


def shard_name(name: str, split: str, index: int, total: int) -> str:
    """TFDS's default file name for shard `index` of `total`."""
    return f"{name}-{split}.array_record-{index:05d}-of-{total:05d}"


@functools.cache
def _uids(path: str) -> frozenset[str]:
    # Read once per worker process rather than shipped with every element.
    return webdataset.read_uids(path)


def _convert(element: tuple[int, str], work: str, name: str, split: str, total: int,
             uid_file: str | None, json_fields: tuple[str, ...] | None) -> None:
    """Beam: one tar -> one shard, its stats left in the work dir for the launcher."""
    index, tar = element
    out = epath.Path(work)
    uids = _uids(uid_file) if uid_file is not None else None
    stats = webdataset.convert_shard(tar, str(out / shard_name(name, split, index, total)),
                                     uids, json_fields)
    (out / _STATS / f"{index:05d}.json").write_text(json.dumps(stats.to_json()))


def _run(plan: dict[str, Any], args: argparse.Namespace, beam_args: list[str]) -> list:
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    tars = plan["tars"]
    options = [f"--runner={args.runner}", *beam_args]
    if args.runner == "DirectRunner":
        options += [f"--direct_num_workers={args.num_workers}",
                    "--direct_running_mode=multi_processing",
                    "--default_sdk_harness_log_level=WARNING"]  # workers' chatter
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    log.info(f"converting {len(tars)} tar(s) into {plan['final']} ({args.runner}"
             + (f", {args.num_workers} worker process(es))" if args.runner == "DirectRunner"
                else ")"))
    convert = functools.partial(
        _convert, work=str(plan["work"]), name=plan["name"], split=plan["split"],
        total=len(tars), uid_file=plan["uid_file"], json_fields=plan["json_fields"])
    done = threading.Event()
    reporter = threading.Thread(target=_report_progress, args=(plan, done), daemon=True)
    reporter.start()
    try:
        with beam.Pipeline(options=PipelineOptions(options)) as pipeline:
            _ = (pipeline
                 | "tars" >> beam.Create(list(enumerate(tars)))
                 | "spread" >> beam.Reshuffle()  # one tar per work item, on any worker
                 | "convert" >> beam.Map(convert))
    finally:
        done.set()
        reporter.join()
    return _read_stats(plan)


def _read_stats(plan: dict[str, Any]) -> list[ShardStats]:
    files = sorted((plan["work"] / _STATS).glob("*.json"))
    return [ShardStats.from_json(json.loads(f.read_text())) for f in files]


def _report_progress(plan: dict[str, Any], done: threading.Event, every: float = 5.0) -> None:
    """A progress line every `every` seconds while the pipeline runs."""
    start, total = time.perf_counter(), len(plan["tars"])
    while not done.wait(every):
        try:
            stats = _read_stats(plan)
        except (OSError, ValueError):  # a file being written: next time
            continue
        if stats:
            log.info(progress_line(stats, total, time.perf_counter() - start))


def progress_line(stats: list[ShardStats], total: int, elapsed: float) -> str:
    """Shards done, examples/s (samples read, kept or not) and ETA at that shard rate."""
    examples = sum(s.records + sum(s.skipped.values()) + s.filtered for s in stats)
    eta = elapsed / len(stats) * (total - len(stats))
    return (f"shards {len(stats)}/{total} done, {examples / elapsed:.0f} examples/s, "
            f"ETA {eta:.0f}s")


def _fields(stats: list[ShardStats], records: int,
            requested: tuple[str, ...] | None) -> dict[str, str]:
    """The json fields to declare: those in every stored record with one type."""
    kinds: dict[str, Counter] = {}
    for s in stats:
        for name, counts in s.fields.items():
            kinds.setdefault(name, Counter()).update(counts)
    chosen = {}
    for name, counts in sorted(kinds.items()):
        if len(counts) == 1 and sum(counts.values()) == records:
            chosen[name] = next(iter(counts))
        elif requested is not None:
            raise InputError(f"--json_fields {name!r} has mixed types across records: "
                             f"{dict(counts)}")
    return chosen


def _finish(plan: dict[str, Any], stats: list[ShardStats]) -> None:
    """Summary, then the metadata (dataset_info.json, features.json), then the rename."""
    import tensorflow_datasets as tfds

    work, final, tars = plan["work"], plan["final"], plan["tars"]
    if len(stats) != len(tars):
        raise InputError(f"{len(tars) - len(stats)} tar(s) were not converted; the partial "
                         f"output is left in {work}")
    records = sum(s.records for s in stats)
    skipped = sum((s.skipped for s in stats), Counter())
    filtered = sum(s.filtered for s in stats)
    seconds = sum(s.seconds for s in stats)
    log.info(f"converted {len(tars)} tar(s): {records} records stored, "
             f"{sum(skipped.values())} skipped, {filtered} not in --uids "
             f"({seconds:.1f} s of work in {len({s.pid for s in stats})} worker process(es))")
    for reason, count in sorted(skipped.items()):
        log.info(f"  skipped {count:6d}: {reason}")
    for s in stats:
        if s.truncated:
            log.warning(f"{s.tar} is truncated or broken ({s.truncated}): kept its "
                        f"{s.records} records before the break")
    if records == 0:
        work.rmtree()
        if plan["uid_file"] is not None and filtered:
            raise InputError(f"--uids {plan['uid_file']} matches no record of the "
                             f"{len(tars)} tar(s) ({filtered} records read, e.g. uids "
                             "are 32 hex digits in DataComp); nothing written")
        raise InputError(f"no good record in the {len(tars)} tar(s); nothing written")
    fields = _fields(stats, records, plan["json_fields"])
    features = webdataset.features_for(fields)
    template = tfds.core.ShardedFileTemplate(
        data_dir=work, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        dataset_name=plan["name"], split=plan["split"], filetype_suffix="array_record")
    split = tfds.core.SplitInfo(
        name=plan["split"], shard_lengths=[s.records for s in stats],
        num_bytes=sum(s.num_bytes for s in stats), filename_template=template)
    identity = tfds.core.dataset_info.DatasetIdentity(
        name=plan["name"], version=tfds.core.Version(VERSION), data_dir=str(work),
        module_name="")
    info = tfds.core.DatasetInfo(
        builder=identity, features=features, disable_shuffling=True,
        description=f"Converted by jest_jax.data.convert from {len(tars)} webdataset tar(s).")
    info.set_file_format("array_record")
    info.set_splits(tfds.core.SplitDict([split]))
    (work / _STATS).rmtree()
    info.write_to_directory(work)
    work.rename(final)
    log.info(f"wrote {plan['name']}:{plan['split']} to {final} (fields: image, caption, uid"
             + "".join(f", {n}" for n in fields) + ")")


if __name__ == "__main__":
    # Run as the module `jest_jax.data.convert`, not `__main__`: Beam pickles `_convert` by
    # reference, and worker processes import it by that name.
    import importlib

    sys.exit(importlib.import_module("jest_jax.data.convert").main())
