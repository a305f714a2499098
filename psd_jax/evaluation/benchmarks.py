"""Evaluation benchmarks, independent of the training data: what to evaluate, on which data.

A `Benchmark` is one dataset split and its task: `zero_shot` classification, image-text
`retrieval` or a `linear_probe`. `CATALOG` names the sets the field reports, as tfds prepares
them (ImageNet-1k and its distribution shifts, the CLIP_benchmark / VTAB classification sets
tfds has) and the project's real sets (emoji, emoji_styles, Fashion-MNIST). `SUITES` groups
them. A config evaluates `eval.suite`: a comma-separated list of suite names, catalog names and
names of the config's own `eval.benchmarks` entries (for Flickr30k, ObjectNet or one's own
data through `image_text_shards` / `image_folder_classification`; for COCO / Flickr30k
retrieval write each image's five captions as five lines of its KEY.txt and set
`caption_lines=True`):

    config.eval.suite = 'imagenet_robustness,cifar100,mine'
    config.eval.benchmarks.mine = dict(task='zero_shot', dataset='image_folder_classification',
                                       builder_config='mine', path='/data/mine', split='test')

Class names and templates (`names`, `templates`) say where they come from: 'imagenet' (OpenAI's
curated ImageNet names, from open_clip), 'imagenet_subset' (those of ImageNet-A / -R's 200
classes), 'cb:<key>' (CLIP_benchmark's list for that key), 'labels' (the dataset's own label
names, as CLIP_benchmark takes them from torchvision), 'labels_spaces' (with '_' as ' ', as
CLIP_benchmark does for Food-101), 'labels_sun397' (CLIP_benchmark's SUN397 rewriting), or
'project' (psd_jax/data/classnames.py, for the project's own sets). psd_jax/evaluation/prompts.py
resolves them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

TASKS = ('zero_shot', 'retrieval', 'linear_probe')
NAME_SOURCES = ('imagenet', 'imagenet_subset', 'labels', 'labels_spaces', 'labels_sun397',
                'project')


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One evaluation: `task` on `split` of `dataset` (a tfds name, 'name/config' allowed, or a
    project builder with `builder_config` and `path`). Zero-shot: class names and templates
    from `names` / `templates`; linear probe: fitted on `train_split` (at most
    `probe_examples` images; 0: eval.probe_examples), scored on `split`. Retrieval with
    `caption_lines`: a record's caption holds one caption per line (COCO and Flickr30k's
    Karpathy test sets: five per image), all of them captions of its one image."""
    task: str
    dataset: str
    split: str
    names: str = ''
    templates: str = ''
    builder_config: str = ''
    path: str = ''
    train_split: str = 'train'
    probe_examples: int = 0
    caption_lines: bool = False  # retrieval: each line of a caption is one caption of the image
    multilabel: str = ''  # zero-shot against label sets in this feature (ImageNet-ReaL)
    data_dir: str = ''  # where it is prepared ('': data.data_dir, else the cache)

    def data_key(self, split: str | None = None) -> tuple[str, ...]:
        """What identifies the images of a split: benchmarks that share it embed it once."""
        return (self.dataset, self.builder_config, self.path, self.data_dir,
                split or self.split)


def _zs(dataset: str, split: str, names: str, templates: str) -> Benchmark:
    return Benchmark('zero_shot', dataset, split, names=names, templates=templates)


_IMAGENET = dict(names='imagenet', templates='cb:imagenet1k')
CATALOG: dict[str, Benchmark] = {
    # ImageNet-1k and its shifts; tfds labels them all in the 1,000-class space
    'imagenet1k': Benchmark('zero_shot', 'imagenet2012', 'validation', **_IMAGENET),
    # the same 50,000 images against ReaL's label sets (Beyer et al. 2020)
    'imagenet_real': Benchmark('zero_shot', 'imagenet2012_real', 'validation',
                               multilabel='real_label', **_IMAGENET),
    'imagenet_v2': Benchmark('zero_shot', 'imagenet_v2', 'test', **_IMAGENET),
    'imagenet_sketch': Benchmark('zero_shot', 'imagenet_sketch', 'test', **_IMAGENET),
    'imagenet_a': _zs('imagenet_a', 'test', 'imagenet_subset', 'cb:imagenet1k'),
    'imagenet_r': _zs('imagenet_r', 'test', 'imagenet_subset', 'cb:imagenet1k'),
    # CLIP_benchmark's classification sets that tfds has (its VTAB test splits where the
    # dataset has a single split: EuroSAT 21,600:, RESISC45 25,200:)
    'cifar10': _zs('cifar10', 'test', 'labels', 'cb:cifar10'),
    'cifar100': _zs('cifar100', 'test', 'labels', 'cb:cifar100'),
    'food101': _zs('food101', 'validation', 'labels_spaces', 'cb:food101'),
    'pets': _zs('oxford_iiit_pet', 'test', 'cb:pets', 'cb:pets'),
    'flowers': _zs('oxford_flowers102', 'test', 'cb:flowers', 'cb:flowers'),
    'dtd': _zs('dtd', 'test', 'labels', 'cb:dtd'),
    'eurosat': _zs('eurosat/rgb', 'train[21600:]', 'cb:eurosat', 'cb:eurosat'),
    'resisc45': _zs('resisc45', 'train[25200:]', 'labels_spaces', 'cb:resisc45'),
    'sun397': _zs('sun397/tfds', 'test', 'labels_sun397', 'cb:sun397'),
    'caltech101': _zs('caltech101', 'test', 'cb:caltech101_vtab', 'cb:caltech101'),
    'cars': _zs('cars196', 'test', 'labels', 'cb:cars'),
    'stl10': _zs('stl10', 'test', 'labels', 'cb:stl10'),
    'mnist': _zs('mnist', 'test', 'cb:mnist', 'cb:mnist'),
    'svhn': _zs('svhn_cropped', 'test', 'cb:svhn', 'cb:svhn'),
    'pcam': _zs('patch_camelyon', 'test', 'cb:pcam', 'cb:pcam'),
    # the project's real sets (prepared from the cache by psd_jax.data.datasets)
    'emoji': Benchmark('zero_shot', 'emoji', 'twitter', names='project', templates='project',
                       builder_config='label'),
    'emoji_styles': Benchmark('retrieval', 'emoji_styles', 'openmoji'),
    'fashion_mnist': _zs('fashion_mnist_local', 'test', 'project', 'project'),
    'fashion_mnist_probe': Benchmark('linear_probe', 'fashion_mnist_local', 'test'),
}

IMAGENET_SHIFTS = ('imagenet_v2', 'imagenet_sketch', 'imagenet_a', 'imagenet_r')
SUITES: dict[str, tuple[str, ...]] = {
    'imagenet_robustness': ('imagenet1k',) + IMAGENET_SHIFTS,
    'vtab_classification': ('cifar10', 'cifar100', 'food101', 'pets', 'flowers', 'dtd',
                            'eurosat', 'resisc45', 'sun397', 'caltech101', 'cars', 'stl10',
                            'mnist', 'svhn', 'pcam'),
    'demo': ('emoji', 'emoji_styles', 'fashion_mnist', 'fashion_mnist_probe'),
}
SUITES['clip_benchmark'] = SUITES['imagenet_robustness'] + SUITES['vtab_classification']


def from_dict(name: str, entry: Mapping[str, Any]) -> Benchmark:
    """A Benchmark from a config entry (`eval.benchmarks.<name>`), its keys checked by name."""
    fields = {f.name for f in dataclasses.fields(Benchmark)}
    unknown = sorted(set(entry) - fields)
    if unknown:
        raise ValueError(f'config.eval.benchmarks.{name}: unknown keys {unknown}; allowed: '
                         f'{sorted(fields)}')
    missing = sorted({'task', 'dataset', 'split'} - set(entry))
    if missing:
        raise ValueError(f'config.eval.benchmarks.{name}: needs {missing}')
    return check(name, Benchmark(**dict(entry)), f'config.eval.benchmarks.{name}')


def check(name: str, bench: Benchmark, where: str) -> Benchmark:
    """Refuse a benchmark whose task or name source is not known, naming the key."""
    if bench.task not in TASKS:
        raise ValueError(f'{where}.task={bench.task!r} is not known; allowed: {list(TASKS)}')
    if bench.task == 'zero_shot':
        for key in ('names', 'templates'):
            value = getattr(bench, key) or 'project'
            if not (value.startswith('cb:') or value in NAME_SOURCES):
                raise ValueError(f'{where}.{key}={value!r} is not known; allowed: '
                                 f"{list(NAME_SOURCES)} or 'cb:<CLIP_benchmark key>'")
    return bench


def resolve(config) -> dict[str, Benchmark]:
    """The benchmarks `config.eval.suite` names, in order, without repeats: suite names expand
    to their members; the config's own `eval.benchmarks` entries may shadow catalog names;
    each is read from its own data_dir, else eval.data_dir, else data.data_dir. Unknown names
    are refused, listing what is known."""
    own = {name: from_dict(name, entry.to_dict() if hasattr(entry, 'to_dict') else entry)
           for name, entry in (config.eval.benchmarks or {}).items()}
    out: dict[str, Benchmark] = {}
    data_dir = config.eval.data_dir or config.data.data_dir
    for name in [n.strip() for n in str(config.eval.suite or '').split(',') if n.strip()]:
        members = SUITES.get(name, (name,)) if name not in own else (name,)
        for member in members:
            bench = own.get(member) or CATALOG.get(member)
            if bench is not None:
                out[member] = dataclasses.replace(bench, data_dir=bench.data_dir or data_dir)
            else:
                raise ValueError(
                    f'config.eval.suite: {member!r} is not a suite, a catalog benchmark or an '
                    f'eval.benchmarks entry; suites: {sorted(SUITES)}; catalog: '
                    f'{sorted(CATALOG)}; own: {sorted(own)}')
    return out
