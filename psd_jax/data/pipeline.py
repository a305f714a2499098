"""grain input pipelines over tfds ArrayRecord data sources.

Random access from `tfds.data_source`; a seeded global shuffle, different every epoch, of which
each host reads its slice of every global batch (the same batches for any number of hosts);
decoding; image preprocessing (psd_jax/data/transforms.py: a random resized crop for
training, open_clip's evaluation transform pixel for pixel for evaluation and the teacher view);
tokenisation; batching to this
host's share of the global batch; worker processes. `iterator.get_state()` /
`set_state()` make the position checkpointable, so a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from typing import Any, Callable, Sequence

import grain.python as grain
from absl import flags
import jax
import numpy as np

from psd_jax.data import transforms
from psd_jax.data.transforms import random_resized_crop
from psd_jax.models.clip import CLIP_MEAN as _MEAN, CLIP_STD as _STD

CLIP_MEAN = np.array(_MEAN, np.float32)
CLIP_STD = np.array(_STD, np.float32)


class NoOpenCvAdvice(logging.Filter):
    """Drops tfds's 'OpenCV is not installed' warning: images are decoded by PIL in the input
    workers, which keep up with the step, so the console need not advise a faster decoder."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith('OpenCV is not installed')


_absl_logger = logging.getLogger('absl')  # in this process and in every input worker, which
if not any(isinstance(f, NoOpenCvAdvice) for f in _absl_logger.filters):  # imports this module
    _absl_logger.addFilter(NoOpenCvAdvice())


def _as_text(x: Any) -> str:
    return x.decode('utf-8') if isinstance(x, bytes) else str(x)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 with CLIP's mean/std, on the host (the batches carry uint8;
    the model normalises them on the device: models.clip.normalize_pixels)."""
    return (image.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD


def _uint8(image: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(image, np.uint8)


NOISE_KINDS = ('shuffle', 'within_group', 'group_name')


class CaptionNoise(grain.RandomAccessDataSource):
    """Corrupts the captions of a seeded `fraction` of the records (noise for experiments).

    kind: 'shuffle' (the chosen records' captions are permuted among themselves, none keeps its
    own: a wrong, unrelated caption), 'within_group' (permuted among chosen records of the same
    `group_key` value, e.g. the emoji subgroup: a plausible caption of a related image, the
    many-to-many noise of web data), or 'group_name' (replaced by the group's name, one generic
    caption shared by every chosen record of the group). Images, labels and the other records
    are untouched; `corrupted` lists the records whose caption changed.
    """

    def __init__(self, source: Any, fraction: float, seed: int, caption_key: str = 'caption',
                 kind: str = 'shuffle', group_key: str = 'subgroup',
                 group_names: Sequence[str] | None = None):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f'data.caption_noise={fraction} must be in [0, 1]')
        if kind not in NOISE_KINDS:
            raise ValueError(f'data.caption_noise_kind={kind!r} is not known; allowed: '
                             f'{list(NOISE_KINDS)}')
        self.source, self.caption_key = source, caption_key
        self._description = (f'fraction={fraction}, seed={seed}, caption_key={caption_key!r}, '
                             f'kind={kind!r}, group_key={group_key!r}')
        n = len(source)
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(n, size=int(round(fraction * n)), replace=False))
        self.caption_of = np.arange(n)
        self.replacement: dict[int, str] = {}
        if kind == 'shuffle':
            self._permute(chosen, rng)
        else:
            if chosen.size and group_key not in source[int(chosen[0])]:
                raise ValueError(f'data.caption_noise_kind={kind!r} needs the records to have '
                                 f'{group_key!r}; this dataset has {sorted(source[0])}')
            groups = np.array([int(source[int(i)][group_key]) for i in chosen], np.int64)
            for g in np.unique(groups):
                members = chosen[groups == g]
                if kind == 'within_group':
                    self._permute(members, rng)
                else:
                    if group_names is None:
                        raise ValueError("caption noise 'group_name' needs the group names")
                    name = str(group_names[g]).replace('-', ' ').replace('_', ' ')
                    self.replacement.update({int(i): name for i in members})
        self.corrupted = np.union1d(np.flatnonzero(self.caption_of != np.arange(n)),
                                    np.array(sorted(self.replacement), np.int64))

    def _permute(self, members: np.ndarray, rng: np.random.Generator) -> None:
        if members.size > 1:  # a cyclic shift of a random order: no member keeps its own
            order = rng.permutation(members)
            self.caption_of[order] = np.roll(order, 1)

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:  # grain compares the source's repr when a state is restored
        return f'CaptionNoise({self.source!r}, {self._description})'

    def __getitem__(self, index: int) -> dict:
        record = dict(self.source[index])
        if index in self.replacement:
            record[self.caption_key] = self.replacement[index]
        donor = int(self.caption_of[index])
        if donor != index:
            record[self.caption_key] = self.source[donor][self.caption_key]
        return record


class WithIndex(grain.RandomAccessDataSource):
    """Adds each record's position in the dataset as 'index' (int32): the key of a teacher's
    embedding bank (psd.teacher='bank')."""

    def __init__(self, source: Any):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:  # grain compares the source's repr when a state is restored
        return f'WithIndex({self.source!r})'

    def __getitem__(self, index: int) -> dict:
        return {**self.source[index], 'index': np.int32(index)}


class Subset(grain.RandomAccessDataSource):
    """The records of `source` at `indices` (in that order): a sample of a split to evaluate
    without reading the rest (e.g. the linear probe's training images)."""

    def __init__(self, source: Any, indices: Sequence[int]):
        self.source, self.indices = source, np.asarray(indices, np.int64)
        if self.indices.ndim != 1 or (self.indices.size and not (
                0 <= self.indices.min() and self.indices.max() < len(source))):
            raise ValueError(f'subset indices must be a 1-d array in [0, {len(source)})')

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        digest = hashlib.blake2b(self.indices.tobytes(), digest_size=8).hexdigest()
        return f'Subset({self.source!r}, {len(self.indices)} indices, blake2b {digest})'

    def __getitem__(self, index: int) -> dict:
        return self.source[int(self.indices[index])]


@dataclasses.dataclass
class Preprocess(grain.RandomMapTransform):
    """Decoded tfds record -> {'image': uint8 (S, S, 3) pixels, 'text': int32 (L,), ...labels}
    (the model normalises the pixels on the device)."""
    image_size: int
    tokenizer: Callable
    context_length: int
    train: bool
    keep: Sequence[str] = ('label',)
    teacher_view: bool = False  # also emit 'teacher_image': the un-augmented centre crop
    crop_scale: tuple[float, float] = (0.9, 1.0)  # area fraction of the random crop

    def random_map(self, record: dict, rng: np.random.Generator) -> dict:
        image = transforms.decode(record['image'])  # once: from bytes (decoding skipped)
        out = {}                                     # or a decoded array
        if self.train:
            if self.teacher_view:
                out['teacher_image'] = transforms.eval_view(image, self.image_size)
            view = random_resized_crop(transforms.rgb_array(image), self.image_size, rng,
                                       scale=self.crop_scale)
        else:
            view = transforms.eval_view(image, self.image_size)
        out['image'] = _uint8(view)
        if 'caption' in record or self.train:  # classification sets have no captions
            out['text'] = self.tokenizer(_as_text(record['caption']), self.context_length)
        for key in self.keep:
            if key in record:
                out[key] = np.asarray(record[key])
        return out


class GlobalBatchSampler:
    """One seeded global order of the records, each global batch split across the hosts.

    Host h of n reads global positions [s B + h b, s B + (h + 1) b) for its s-th batch (B the
    global batch, b = B / n), and every record's augmentation RNG is keyed by its global
    position. So the global batches, and the augmentations in them, are the same for any number
    of hosts: a run on 1 host and on 8 sees the same data in the same order. Shuffled anew every
    epoch (grain's IndexSampler over all records, no per-host shards).

    repeated_pairs = k > 0 (the previous-step teacher, psd.teacher='previous_step'): the first
    k slots of global batch s > 0 repeat slots [k, 2k) of batch s - 1, so those pairs are seen
    in two consecutive steps; the order then advances B - k records per batch (batch 0 reads B).
    Augmentations are keyed by the global slot, so a repeated pair gets a fresh crop. Needs
    k <= B / 2.
    """

    def __init__(self, num_records: int, global_batch: int, seed: int, shuffle: bool = True,
                 num_epochs: int | None = None, host: int | None = None,
                 hosts: int | None = None, start_batch: int = 0, repeated_pairs: int = 0):
        self.hosts = jax.process_count() if hosts is None else hosts
        self.host = jax.process_index() if host is None else host
        if global_batch % self.hosts:
            raise ValueError(f'global batch {global_batch} does not divide across {self.hosts} '
                             'hosts')
        if not 0 <= self.host < self.hosts:
            raise ValueError(f'host {self.host} is not in [0, {self.hosts})')
        self.global_batch, self.host_batch = global_batch, global_batch // self.hosts
        self.start_batch = start_batch  # local index 0 is global batch `start_batch`
        if not 0 <= 2 * repeated_pairs <= global_batch:
            raise ValueError(f'repeated_pairs={repeated_pairs} per batch: need 0 <= '
                             f'repeated_pairs <= half the global batch ({global_batch})')
        self.repeated_pairs, self.seed = repeated_pairs, seed
        self.order = grain.IndexSampler(num_records=num_records, shard_options=grain.NoSharding(),
                                        shuffle=shuffle, num_epochs=num_epochs, seed=seed)

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        step, offset = divmod(index, self.host_batch)
        step += self.start_batch
        slot = self.host * self.host_batch + offset
        if not self.repeated_pairs:
            record = self.order[step * self.global_batch + slot]
            return grain.RecordMetadata(index=index, record_key=record.record_key, rng=record.rng)
        k, advance = self.repeated_pairs, self.global_batch - self.repeated_pairs
        position = step * advance + slot
        if step > 0 and slot < k:  # slot k + slot of the previous batch
            position = (step - 1) * advance + k + slot
        rng = np.random.Generator(np.random.Philox(key=self.seed + step * self.global_batch + slot))
        return grain.RecordMetadata(index=index, record_key=self.order[position].record_key,
                                    rng=rng)

    def __repr__(self) -> str:
        # grain stores this text in a checkpoint's data state and refuses to restore into a
        # sampler whose text differs, so it is a stored format: `carried=` is the name that
        # checkpoints of earlier versions hold for repeated_pairs, kept so that they resume.
        return (f'GlobalBatchSampler(global_batch={self.global_batch}, host={self.host}, '
                f'hosts={self.hosts}, start_batch={self.start_batch}, '
                f'carried={self.repeated_pairs}, order={self.order!r})')


def per_host_batch(global_batch: int) -> int:
    """This host's share of the global batch."""
    hosts = jax.process_count()
    if global_batch % hosts:
        raise ValueError(f'global batch {global_batch} does not divide across {hosts} hosts')
    return global_batch // hosts


def make_loader(source: Any, *, global_batch: int, image_size: int, tokenizer: Callable,
                context_length: int, train: bool, seed: int = 0, num_epochs: int | None = None,
                worker_count: int = 0, keep: Sequence[str] = ('label',),
                drop_remainder: bool = True, teacher_view: bool = False,
                crop_scale: tuple[float, float] = (0.9, 1.0),
                start_batch: int = 0, repeated_pairs: int = 0, read_threads: int = 0,
                read_ahead: int = 0) -> grain.DataLoader:
    """A grain DataLoader over a random-access `source` (e.g. `tfds.data_source(...)`).

    Training: shuffled with `seed` (a new order every epoch), endless unless `num_epochs`; each
    host reads its slice of every global batch (`GlobalBatchSampler`: the same global batches
    for any number of hosts), with `repeated_pairs` pairs of each batch repeated from the
    previous one. Evaluation (`train=False`): in order, one epoch, the records split
    into one contiguous shard per host. Yields this host's batches. `read_threads` threads
    read up to `read_ahead` records ahead (0, 0: records are read as the pipeline needs them,
    the fastest for local data: a deep read-ahead costs the pipeline's thread time polling it).
    """
    if len(source) == 0:
        raise ValueError('the data source is empty')
    if worker_count and not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags; outside an absl app
    if train:  # the sampler picks this host's records itself
        sampler = GlobalBatchSampler(len(source), global_batch, seed, num_epochs=num_epochs,
                                     start_batch=start_batch, repeated_pairs=repeated_pairs)
        shard_options = grain.NoSharding()
    else:
        sampler = grain.IndexSampler(
            num_records=len(source),
            shard_options=grain.ShardByJaxProcess(drop_remainder=drop_remainder),
            shuffle=False, num_epochs=1, seed=seed)
        shard_options = None  # taken from the sampler
    if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
        raise ValueError(f'data.crop_scale={crop_scale}: need 0 < min <= max <= 1')
    ops = [Preprocess(image_size, tokenizer, context_length, train, tuple(keep), teacher_view,
                      tuple(crop_scale)),
           grain.Batch(per_host_batch(global_batch), drop_remainder=drop_remainder)]
    return grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                            worker_count=worker_count, shard_options=shard_options,
                            read_options=grain.ReadOptions(num_threads=read_threads,
                                                           prefetch_buffer_size=read_ahead))
