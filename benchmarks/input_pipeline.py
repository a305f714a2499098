"""Throughput of the training input pipeline (decode, random resized crop, CLIP BPE tokenisation,
batching) on the emoji dataset, by image size, grain worker count and read-ahead setting.

    python -m psd_jax.data.fetch && python benchmarks/input_pipeline.py [--sizes 64 224]

Prints a table of images/s (median of --repeats timed runs of --batches batches each, after one
warm-up batch) and writes JSON next to this script under results/.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--sizes', type=int, nargs='+', default=[64, 224])
    parser.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--read', nargs='+', default=['0,0', '16,500'],
                        help='read_threads,read_ahead pairs (16,500: grain\'s own defaults)')
    parser.add_argument('--batch', type=int, default=64)
    parser.add_argument('--batches', type=int, default=15)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--out', default=str(pathlib.Path(__file__).parent / 'results' /
                                             'input_pipeline.json'))
    args = parser.parse_args()

    from psd_jax.data import datasets, fetch, pipeline
    from psd_jax.data.tokenizers import ClipTokenizer

    datasets.prepare('emoji')
    source = datasets.data_source('emoji', 'google')
    tokenizer = ClipTokenizer(fetch.clip_vocab())
    rows = []
    print(f'emoji (google split, {len(source)} images of 64 px), batch {args.batch}, '
          f'median of {args.repeats} x {args.batches} batches')
    print(f'{"size":>5} {"workers":>8} {"read threads,ahead":>19} {"images/s":>10}')
    grid = [(size, workers, tuple(int(x) for x in read.split(',')))
            for size in args.sizes for workers in args.workers for read in args.read]
    for size, workers, (threads, ahead) in grid:
        rates = []
        for repeat in range(args.repeats):
            loader = pipeline.make_loader(
                source, global_batch=args.batch, image_size=size, tokenizer=tokenizer,
                context_length=77, train=True, seed=repeat, worker_count=workers,
                read_threads=threads, read_ahead=ahead)
            it = iter(loader)
            next(it)  # warm-up: starts the workers
            start = time.perf_counter()
            for _ in range(args.batches):
                next(it)
            rates.append(args.batches * args.batch / (time.perf_counter() - start))
            del it
        rate = statistics.median(rates)
        rows.append({'image_size': size, 'workers': workers, 'read_threads': threads,
                     'read_ahead': ahead, 'images_per_s': rate, 'runs': rates})
        print(f'{size:>5} {workers:>8} {f"{threads},{ahead}":>19} {rate:>10.0f}')
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from psd_jax import provenance
    out.write_text(json.dumps({**provenance.record('python benchmarks/input_pipeline.py'),
                               'batch': args.batch, 'rows': rows}, indent=1))
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
