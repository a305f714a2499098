"""Make psd_jax/data/imagenet_classnames.tsv: a readable name for each ImageNet-1k class.

The class order is tfds's (imagenet2012 labels.txt: WordNet noun ids, shared by imagenet_v2,
imagenet_sketch, imagenet_r and imagenet_a, which all label in the 1,000-class space). Names are
the synsets' lemmas from WordNet 3.0 (Debian package wordnet-base), underscores as spaces; when
two classes share a first lemma (e.g. the crane bird and the crane machine), each takes its
first lemma that no other class uses, or else its first lemma with the parent synset's.

    apt-get install wordnet-base && python scripts/make_imagenet_classnames.py
"""

from __future__ import annotations

import collections
import os
import pathlib

import tensorflow_datasets as tfds

WORDNET = pathlib.Path('/usr/share/wordnet/data.noun')
OUT = pathlib.Path(__file__).resolve().parents[1] / 'psd_jax' / 'data' / 'imagenet_classnames.tsv'


def read_wordnet(path: pathlib.Path) -> dict[str, tuple[list[str], str | None]]:
    """offset -> (lemmas, first hypernym offset)."""
    synsets = {}
    for line in path.read_text(encoding='utf-8').splitlines():
        if line.startswith(' '):
            continue  # licence header
        fields = line.split(' | ')[0].split()
        offset, count = fields[0], int(fields[3], 16)
        lemmas = [fields[4 + 2 * i].replace('_', ' ') for i in range(count)]
        rest = fields[4 + 2 * count:]
        pointers = int(rest[0])
        hypernym = None
        for i in range(pointers):
            symbol, target = rest[1 + 4 * i], rest[2 + 4 * i]
            if symbol == '@' and hypernym is None:
                hypernym = target
        synsets[offset] = (lemmas, hypernym)
    return synsets


def main() -> None:
    labels = pathlib.Path(os.path.dirname(tfds.__file__)) / 'datasets' / 'imagenet2012' / 'labels.txt'
    wnids = labels.read_text().split()
    synsets = read_wordnet(WORDNET)
    lemmas = {w: synsets[w[1:]][0] for w in wnids}
    # compared lower-cased: the tokenizer lower-cases, so 'Cardigan' (the dog) and 'cardigan'
    # (the sweater) would embed the same
    first = collections.Counter(v[0].lower() for v in lemmas.values())
    all_lemmas = collections.Counter(l.lower() for v in lemmas.values() for l in set(v))
    names = {}
    for w in wnids:
        candidates = lemmas[w]
        if first[candidates[0].lower()] == 1:
            names[w] = candidates[0]
            continue
        unique = [l for l in candidates if all_lemmas[l.lower()] == 1]
        if unique:
            names[w] = unique[0]
        else:
            parent = synsets[w[1:]][1]
            names[w] = f'{candidates[0]} ({synsets[parent][0][0]})' if parent else candidates[0]
    assert len({n.lower() for n in names.values()}) == len(wnids), 'names are not unique'
    OUT.write_text(''.join(f'{w}\t{names[w]}\n' for w in wnids))
    print(f'wrote {len(wnids)} names to {OUT}')


if __name__ == '__main__':
    main()
