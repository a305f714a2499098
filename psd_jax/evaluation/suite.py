"""Run a suite of benchmarks on one model state: each split embedded once, each classifier once.

`Suite(config, model, variables, mesh, tokenizer).run(benchmarks)` evaluates every benchmark
(psd_jax/evaluation/benchmarks.py) and returns a `SuiteReport`: per benchmark its metrics and
its headline number (zero-shot top-1; retrieval: the mean of image->text and text->image R@1;
linear probe: accuracy), the suite's average of the headlines, and the effective-robustness
report (psd_jax/evaluation/robustness.py) whenever ImageNet-1k and one of its shifts are in it.
A benchmark that fails does not stop the others: its error is kept in the report.
`report.flat()` gives the metrics as `eval/<benchmark>/<metric>`; `write_report` writes the
table as markdown and JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import numpy as np

from psd_jax.data.from_config import eval_loader, open_split
from psd_jax.data.pipeline import Subset
from psd_jax.evaluation import prompts, robustness
from psd_jax.evaluation.benchmarks import IMAGENET_SHIFTS, Benchmark
from psd_jax.evaluation.embed import embed_batches, embed_tokens
from psd_jax.evaluation.linear_probe import linear_probe
from psd_jax.evaluation.retrieval import caption_groups, retrieval_metrics
from psd_jax.evaluation.zero_shot import class_embeddings, zero_shot_metrics

HEADLINE = {'zero_shot': 'top1', 'retrieval': 'mean_R@1', 'linear_probe': 'accuracy'}
ROBUSTNESS_NAMES = {'imagenet1k': 'imagenet2012', **{s: s for s in IMAGENET_SHIFTS}}


class NonFiniteEmbeddings(ValueError):
    """The model gives NaN or infinite embeddings: no metric of it means anything."""


def check_finite(embeddings: dict[str, np.ndarray], what: str) -> None:
    """Refuse to score embeddings that are not all finite (a diverged model)."""
    for key in ('image', 'text'):
        if key in embeddings:
            bad = int(np.sum(~np.all(np.isfinite(embeddings[key]), axis=1)))
            if bad:
                raise NonFiniteEmbeddings(
                    f'{what}: {bad} of {len(embeddings[key])} {key} embeddings are not finite '
                    '(the model diverged); no evaluation is reported for it')


def _features(source) -> dict:
    return dict(getattr(getattr(source, 'dataset_info', None), 'features', {}) or {})


def label_names(features: dict, bench: Benchmark) -> list[str] | None:
    """The class names of the benchmark's label feature (a ClassLabel, or a sequence of them
    for multi-label sets), or None when it has none."""
    feature = features.get(bench.multilabel or 'label')
    names = getattr(feature, 'names', None) or getattr(getattr(feature, 'feature', None),
                                                       'names', None)
    return list(names) if names else None


def multilabel_accuracy(image: np.ndarray, classes: np.ndarray, source,
                        key: str) -> tuple[dict, int]:
    """Top-1 accuracy against label sets (ImageNet-ReaL): a prediction is right when it is in
    the image's set; images with an empty set are left out, as ReaL's authors do. The sets
    are read from the records (they do not batch), in the order the images were embedded."""
    sets = [set(np.asarray(source[i][key]).reshape(-1).tolist()) for i in range(len(source))]
    if len(sets) != len(image):
        raise ValueError(f'{len(image)} images embedded but {len(sets)} label sets')
    predicted = np.argmax(np.asarray(image, np.float32) @ np.asarray(classes, np.float32).T, 1)
    scored = [i for i, labels in enumerate(sets) if labels]
    if not scored:
        raise ValueError(f'no image has a label in {key!r}')
    hits = [int(predicted[i]) in sets[i] for i in scored]
    return {'top1': float(np.mean(hits)), 'scored_images': float(len(scored))}, len(scored)


@dataclasses.dataclass
class SuiteReport:
    """What one evaluation of a suite gave (fractions, not percentages)."""
    rows: list[dict] = dataclasses.field(default_factory=list)
    errors: dict[str, str] = dataclasses.field(default_factory=dict)
    robustness: dict[str, float] | None = None

    @property
    def average(self) -> float | None:
        values = [r['headline'] for r in self.rows]
        return float(np.mean(values)) if values else None

    def flat(self) -> dict[str, float]:
        out = {f'eval/{r["name"]}/{k}': float(v) for r in self.rows
               for k, v in r['metrics'].items()}
        if self.rows:
            out['eval/suite/average'] = self.average
            out['eval/suite/benchmarks'] = float(len(self.rows))
        for key, value in (self.robustness or {}).items():
            out[f'eval/robustness/{key}'] = float(value)
        return out

    def to_json(self, **header: Any) -> dict:
        return {**header, 'average': self.average, 'benchmarks': self.rows,
                'failed': self.errors, 'robustness': self.robustness}

    def markdown(self, title: str) -> str:
        lines = [f'### {title}', '', '| benchmark | task | data | headline | value | images |',
                 '|---|---|---|---|---:|---:|']
        for r in self.rows:
            lines.append(f'| {r["name"]} | {r["task"]} | {r["data"]} | {r["headline_metric"]} '
                         f'| {100 * r["headline"]:.2f}% | {r["images"]:,} |')
        if self.rows:
            lines.append(f'| **average** ({len(self.rows)}) | | | | '
                         f'**{100 * self.average:.2f}%** | |')
        for name, error in self.errors.items():
            lines.append(f'| {name} | failed | {error} | | | |')
        if self.robustness:
            rb = self.robustness
            lines += ['', f'Effective robustness: {100 * rb["effective_robustness"]:+.2f} points '
                          f'(average shift accuracy {100 * rb["average_shift_accuracy"]:.2f}% '
                          f'against {100 * rb["baseline_prediction"]:.2f}% predicted by the '
                          'ImageNet testbed\'s standard models at this ImageNet accuracy)']
        return '\n'.join(lines) + '\n'


class Suite:
    """Evaluates benchmarks on one model state, caching embedded splits and classifiers."""

    def __init__(self, config, model, variables, mesh, tokenizer):
        self.config, self.model, self.variables = config, model, variables
        self.mesh, self.tokenizer = mesh, tokenizer
        self._images: dict[tuple, tuple[dict, Any]] = {}
        self._classes: dict[tuple, np.ndarray] = {}

    def source(self, bench: Benchmark, split: str):
        return open_split(self.config, split, dataset=bench.dataset,
                          builder_config=bench.builder_config, path=bench.path or None,
                          data_dir=bench.data_dir or None)

    def embedded(self, bench: Benchmark, split: str, sample: int = 0) -> tuple[dict, Any]:
        """(embeddings of the split, its source), computed once per split and sample."""
        key = bench.data_key(split) + (sample,)
        if key not in self._images:
            source = full = self.source(bench, split)
            if sample and sample < len(source):
                chosen = np.random.default_rng(0).permutation(len(source))[:sample]
                source = Subset(source, chosen)
            per_host = math.ceil(len(source) / jax.process_count())
            emb = embed_batches(self.model, self.variables,
                                eval_loader(self.config, source, self.tokenizer), self.mesh,
                                self.config.eval.batch,
                                num_batches=math.ceil(per_host / self.config.eval.batch))
            check_finite(emb, f'{bench.dataset} split {split!r}')
            self._images[key] = (emb, full)
        return self._images[key]

    def classifier(self, names: list[str], templates: list[str]) -> np.ndarray:
        key = (tuple(names), tuple(templates))
        if key not in self._classes:
            self._classes[key] = class_embeddings(
                self.model, self.variables, self.tokenizer, names, templates, self.mesh,
                self.config.eval.batch, self.config.model.context_length)
        return self._classes[key]

    def zero_shot(self, bench: Benchmark) -> tuple[dict, int]:
        emb, source = self.embedded(bench, bench.split)
        names, templates, mapping = prompts.classifier_labels(
            bench, label_names(_features(source), bench))
        classes = self.classifier(names, templates)
        if bench.multilabel:
            return multilabel_accuracy(emb['image'], classes, source, bench.multilabel)
        if 'label' not in emb:
            raise ValueError(f'zero-shot classification needs labels; {bench.dataset!r} split '
                             f'{bench.split!r} has none')
        labels = emb['label']
        if mapping is not None:
            labels = mapping[labels]
            if np.any(labels < 0):
                raise ValueError(f'{bench.dataset}: {int(np.sum(labels < 0))} images carry a '
                                 'label outside its classes')
        result = zero_shot_metrics(emb['image'], labels, classes)
        return {k: v for k, v in result.items() if k != 'per_class'}, len(labels)

    def retrieval(self, bench: Benchmark) -> tuple[dict, int]:
        emb, source = self.embedded(bench, bench.split)
        if bench.caption_lines:  # several captions per image, one per line
            captions, owner = [], []
            for i in range(len(source)):
                text = source[i]['caption']
                lines = [line.strip() for line in (text.decode('utf-8') if isinstance(
                    text, bytes) else str(text)).splitlines() if line.strip()]
                captions += lines
                owner += [i] * len(lines)
            tokens = np.asarray(self.tokenizer(captions, self.config.model.context_length))
            texts = embed_tokens(self.model, self.variables, tokens, self.mesh,
                                 self.config.eval.batch)
            check_finite({'text': texts}, f'{bench.dataset} split {bench.split!r} captions')
            result = retrieval_metrics(emb['image'], texts, text_to_image=np.asarray(owner),
                                       text_group=caption_groups(captions))
        else:
            result = retrieval_metrics(emb['image'], emb['text'],
                                       text_group=emb.get('caption_id'))
        result['mean_R@1'] = (result['i2t_R@1'] + result['t2i_R@1']) / 2
        return result, len(emb['image'])

    def linear_probe(self, bench: Benchmark) -> tuple[dict, int]:
        sample = bench.probe_examples or self.config.eval.probe_examples
        train, _ = self.embedded(bench, bench.train_split, sample=sample)
        test, _ = self.embedded(bench, bench.split)
        for part, what in ((train, bench.train_split), (test, bench.split)):
            if 'label' not in part:
                raise ValueError(f'{bench.dataset!r} split {what!r} has no labels for the '
                                 'linear probe')
        result = linear_probe(train['image'], train['label'], test['image'], test['label'])
        return {'accuracy': result['accuracy'], 'l2': result['l2']}, len(test['image'])

    def run(self, benchmarks: dict[str, Benchmark]) -> SuiteReport:
        report = SuiteReport()
        for name, bench in benchmarks.items():
            try:
                metrics, images = getattr(self, bench.task)(bench)
            except (ValueError, FileNotFoundError) as e:
                report.errors[name] = str(e)
                continue
            data = f'{bench.dataset}{"/" + bench.builder_config if bench.builder_config else ""}'
            report.rows.append({
                'name': name, 'task': bench.task, 'data': f'{data}:{bench.split}',
                'headline_metric': HEADLINE[bench.task], 'images': images,
                'headline': float(metrics[HEADLINE[bench.task]]),
                'metrics': {k: float(v) for k, v in metrics.items()}})
        accuracies = {ROBUSTNESS_NAMES[r['name']]: r['headline'] for r in report.rows
                      if r['name'] in ROBUSTNESS_NAMES and r['task'] == 'zero_shot'}
        if 'imagenet2012' in accuracies and len(accuracies) > 1:
            report.robustness = robustness.robustness_report(accuracies)
        return report


def write_report(directory, stem: str, report: SuiteReport, **header: Any) -> None:
    """<directory>/<stem>.md and <stem>.json (process 0 writes)."""
    if jax.process_index() != 0:
        return
    from etils import epath
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    title = ', '.join(f'{k} {v}' for k, v in header.items())
    (directory / f'{stem}.md').write_text(report.markdown(f'Evaluation suite: {title}'))
    (directory / f'{stem}.json').write_text(json.dumps(report.to_json(**header), indent=1))
    from absl import logging
    average = 'no benchmark' if report.average is None else f'{100 * report.average:.2f}%'
    logging.info('evaluation suite (%s): average %s over %d benchmarks%s; table in %s', title,
                 average, len(report.rows),
                 f', {len(report.errors)} failed' if report.errors else '',
                 directory / f'{stem}.md')
