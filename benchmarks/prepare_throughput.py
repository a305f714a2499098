"""Images per second of preparing image_text_shards: in one process, and as an Apache Beam
pipeline on 1 and 2 local worker processes (more with --workers), on webdataset tar shards of
real emoji artwork re-encoded as JPEGs of 224-384 px sides (written by this script), with and
without resizing at preparation.

    python benchmarks/prepare_throughput.py [--shards 16] [--per_shard 150] [--repeats 3]
        [--workers 1 2] [--out benchmarks/results/prepare_throughput.json]

Prints a table of medians over --repeats runs (each prepares everything into a fresh folder,
Beam's start-up included) and writes the JSON with the commit and command.
"""

from __future__ import annotations

import argparse
import io
import json
import pathlib
import statistics
import tarfile
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_shards(root: pathlib.Path, shards: int, per_shard: int, seed: int = 0) -> int:
    """Tar shards of JPEGs with random sides in [224, 384]; returns the image count."""
    import numpy as np
    from PIL import Image

    from psd_jax.data import fetch
    from psd_jax.data.emoji import load_metadata, png_on_white
    sources = fetch.cache_dir() / 'emoji_sources'
    entries, _, _ = load_metadata(sources)
    folder = sources / 'emoji-datasource-google' / 'package' / 'img' / 'google' / '64'
    rng = np.random.default_rng(seed)
    n = 0
    for shard in range(shards):
        with tarfile.open(root / f'{shard:05d}.tar', 'w') as tar:
            for i in range(per_shard):
                entry = entries[n % len(entries)]
                size = tuple(int(x) for x in rng.integers(224, 385, size=2))
                art = Image.open(png_on_white(folder / entry['image'])).resize(
                    size, Image.Resampling.BICUBIC)
                out = io.BytesIO()
                art.save(out, format='JPEG', quality=90)
                for name, data in ((f'{i:05d}.jpg', out.getvalue()),
                                   (f'{i:05d}.txt', entry['label'].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--shards', type=int, default=16)
    parser.add_argument('--per_shard', type=int, default=150)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--workers', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--resize_shorter', type=int, default=160,
                        help='the resizing row\'s shorter side')
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' /
                                             'prepare_throughput.json'))
    args = parser.parse_args()
    import logging
    logging.getLogger('apache_beam').setLevel(logging.ERROR)
    from psd_jax.data import datasets

    work = pathlib.Path(tempfile.mkdtemp(prefix='prepare_throughput_'))
    source = work / 'shards'
    source.mkdir()
    images = write_shards(source, args.shards, args.per_shard)
    size = sum(p.stat().st_size for p in source.glob('*.tar'))
    ways = [('one process', datasets.Preparation(workers=0))]
    ways += [(f'Beam, {w} worker(s)', datasets.Preparation(workers=w)) for w in args.workers]
    ways += [(f'one process, resize to {args.resize_shorter}',
              datasets.Preparation(workers=0, resize_shorter=args.resize_shorter))]
    rows = []
    for label, how in ways:
        seconds = []
        for repeat in range(args.repeats):
            data_dir = work / f'out_{len(rows)}_{repeat}'
            start = time.perf_counter()
            datasets.prepare('image_text_shards', data_dir, 'bench', str(source), how)
            seconds.append(time.perf_counter() - start)
        median = statistics.median(seconds)
        rows.append({'way': label, 'workers': how.workers, 'resize_shorter': how.resize_shorter,
                     'seconds': seconds, 'median_s': median, 'images_per_s': images / median})
        print(f'{label:>32}: {images / median:8.1f} images/s (median of {args.repeats}: '
              f'{median:.2f} s)', flush=True)
    base = rows[0]['images_per_s']
    print(f'\n{"way":>32} {"images/s":>9} {"vs one process":>15}')
    for row in rows:
        print(f'{row["way"]:>32} {row["images_per_s"]:9.1f} '
              f'{row["images_per_s"] / base:14.2f}x')
    from psd_jax import provenance
    result = {**provenance.record('python benchmarks/prepare_throughput.py'),
              'machine_cores': __import__('os').cpu_count(), 'images': images,
              'shard_bytes': size, 'rows': rows}
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
