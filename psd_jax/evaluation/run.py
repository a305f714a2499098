"""The evaluators a config can list (`config.eval.evaluators`) and its benchmark suite
(`config.eval.suite`), run in the loop and standalone.

Evaluators score the *training* dataset's `eval.split`:
- `retrieval`: image <-> caption retrieval (identical captions are interchangeable).
- `zero_shot`: classification into the dataset's classes (psd_jax/evaluation/prompts.py).
- `linear_probe`: logistic regression on frozen image features of `eval.probe_dataset`
  (train split -> test split), at most `eval.probe_examples` training images.
The suite scores any list of benchmarks independent of the training data
(psd_jax/evaluation/benchmarks.py, psd_jax/evaluation/suite.py). Both share one cache: each
split is embedded once per evaluation.
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

from psd_jax.data import classnames
from psd_jax.data.from_config import open_split
from psd_jax.evaluation import benchmarks as benchmarks_lib
from psd_jax.evaluation.benchmarks import Benchmark
from psd_jax.evaluation.suite import (NonFiniteEmbeddings, Suite, SuiteReport, _features,
                                      check_finite, label_names, write_report)

__all__ = ['NonFiniteEmbeddings', 'check_finite', 'run_evaluators', 'check_evaluators']


def suite_only(config: ml_collections.ConfigDict,
               suite: str | None) -> ml_collections.ConfigDict:
    """The config with eval.suite = `suite` and no training-data evaluators, when `suite` is
    given (`python -m psd_jax.evaluate --suite NAME`); else the config as it is."""
    if suite:
        with config.unlocked():
            config.eval.suite = suite
            config.eval.evaluators = ()
    return config


def training_benchmark(config: ml_collections.ConfigDict, task: str) -> Benchmark:
    """The legacy evaluator `task` as a benchmark on the training dataset's eval.split."""
    dataset = config.data.dataset
    if task == 'linear_probe':
        return Benchmark('linear_probe', config.eval.probe_dataset, 'test',
                         data_dir=config.data.data_dir)
    own = dataset.split('/')[0] in classnames.CLASS_NAMES
    return Benchmark(task, dataset, config.eval.split, builder_config=config.data.builder_config,
                     path=config.data.path, names='project' if own else 'labels_spaces',
                     templates='project', data_dir=config.data.data_dir)


def _evaluator(task: str) -> Callable:
    def evaluate(config, model, variables, mesh, tokenizer, suite=None) -> dict[str, float]:
        suite = suite or Suite(config, model, variables, mesh, tokenizer)
        metrics, _ = getattr(suite, task)(training_benchmark(config, task))
        return metrics
    evaluate.__name__ = task
    return evaluate


EVALUATORS: dict[str, Callable] = {task: _evaluator(task)
                                   for task in ('retrieval', 'zero_shot', 'linear_probe')}


class EvaluationFailed(ValueError):
    """One or more evaluators failed; `partial` holds the results of those that did not."""

    def __init__(self, message: str, partial: dict[str, float]):
        super().__init__(message)
        self.partial = partial


def run_evaluators(config: ml_collections.ConfigDict, model, variables: Any, mesh,
                   tokenizer, report_dir=None, **header: Any) -> dict[str, float]:
    """{'eval/<evaluator>/<metric>': value} for every evaluator the config lists, and
    {'eval/<benchmark>/<metric>', 'eval/suite/average', 'eval/robustness/...'} for its suite,
    whose table goes to `report_dir`/suite_<header values>.md and .json when given. Everything
    runs even when an earlier part fails; then EvaluationFailed names the failures and carries
    the others' results."""
    check_names(config)
    suite = Suite(config, model, variables, mesh, tokenizer)
    out, errors = {}, []
    for name in config.eval.evaluators:
        try:
            result = EVALUATORS[name](config, model, variables, mesh, tokenizer, suite)
        except (ValueError, FileNotFoundError) as e:
            errors.append(f'{name}: {e}')
            continue
        out.update({f'eval/{name}/{k}': float(v) for k, v in result.items()})
    chosen = benchmarks_lib.resolve(config)
    if chosen:
        report: SuiteReport = suite.run(chosen)
        out.update(report.flat())
        errors += [f'{name}: {e}' for name, e in report.errors.items()]
        if report_dir is not None:
            stem = 'suite_' + '_'.join(f'{k}_{v}' if k == 'step' else str(v)
                                       for k, v in header.items())
            write_report(report_dir, stem, report, **header)
    if errors:
        raise EvaluationFailed('evaluation failed: ' + '; '.join(errors), out)
    return out


def check_names(config: ml_collections.ConfigDict) -> None:
    """Every evaluator and suite entry is known (raises ValueError naming the key)."""
    for name in config.eval.evaluators:
        if name not in EVALUATORS:
            raise ValueError(f'config.eval.evaluators: {name!r} is not known; allowed: '
                             f'{sorted(EVALUATORS)}')
    clash = sorted(set(benchmarks_lib.resolve(config)) & (set(EVALUATORS) | {'suite',
                                                                            'robustness'}))
    if clash:
        raise ValueError(f'config.eval.benchmarks: {clash} would share metric names with the '
                         'evaluators; rename them')


def check_evaluators(config: ml_collections.ConfigDict) -> None:
    """Before training: every evaluator and suite benchmark is known, and its data exists and
    has what its task needs (the split; captions for retrieval; labels and matching class
    names for zero-shot; labelled train and test splits for the probe), and the zero-shot
    metadata is fetched, so that no error waits for the first evaluation."""
    check_names(config)
    for name in config.eval.evaluators:
        where = (f'config.eval.probe_dataset={config.eval.probe_dataset!r}'
                 if name == 'linear_probe' else f'config.eval.split={config.eval.split!r}')
        check_data(config, training_benchmark(config, name), f'{where} ({name})')
    for name, bench in benchmarks_lib.resolve(config).items():
        check_data(config, bench, f'config.eval.suite: benchmark {name!r}')


def check_data(config: ml_collections.ConfigDict, bench: Benchmark, where: str) -> None:
    """Refuse, naming `where`, a benchmark whose data is missing or lacks what its task
    needs."""
    from psd_jax.evaluation import prompts
    splits = (bench.split,) + ((bench.train_split,) if bench.task == 'linear_probe' else ())
    for split in splits:
        try:
            source = open_split(config, split, dataset=bench.dataset,
                                builder_config=bench.builder_config, path=bench.path or None,
                                data_dir=bench.data_dir or None)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f'{where}: {e}') from e
        features = _features(source)
        needed = 'caption' if bench.task == 'retrieval' else (bench.multilabel or 'label')
        if needed not in features:
            raise ValueError(f'{where}: {bench.task} needs {needed!r}; {bench.dataset} split '
                             f'{split!r} has only {sorted(features)}')
    if bench.task == 'zero_shot':
        prompts.classifier_labels(bench, label_names(features, bench))
