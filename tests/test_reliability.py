"""Reliability without training: the resume check, the workdir lock, ranking of broken models
(docs/reliability.md lists every fault and the tests that inject it)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from psd_jax import config as config_lib
from psd_jax.persistence import resume_rules, workdir
from psd_jax.evaluation.retrieval import retrieval_metrics
from psd_jax.evaluation.zero_shot import zero_shot_metrics


def saved_and_new(**changes):
    saved = config_lib.base_config().to_dict()
    new = config_lib.base_config()
    for key, value in changes.items():
        node = new
        *path, leaf = key.split('.')
        for part in path:
            node = node[part]
        node[leaf] = value
    return saved, new.to_dict()


@pytest.mark.parametrize('key,value', [
    ('loss.kind', 'clip'), ('loss.psd.teacher', 'bank'), ('data.global_batch', 128),
    ('seed', 7), ('model.preset', 'ViT-B/32'), ('model.embed_dim', 256),
    ('data.path', '/elsewhere'), ('optim.lr', 0.5), ('data.caption_noise', 0.2)])
def test_a_change_that_defines_the_run_is_refused_by_name(key, value):
    saved, new = saved_and_new(**{key: value})
    old = resume_rules.flatten(saved)[key]
    with pytest.raises(ValueError, match=rf'config\.{key}: {old!r} -> {value!r}'.replace(
            '(', r'\(').replace(')', r'\)')) as error:
        resume_rules.check_resume(saved, new, 10, '/w/checkpoints')
    assert 'resume_allow_changes' in str(error.value) and 'new --workdir' in str(error.value)


def test_watching_keys_and_more_steps_may_change_and_are_reported():
    saved, new = saved_and_new(**{'train.steps': 500, 'train.log_every': 5,
                                  'eval.evaluators': ('retrieval', 'zero_shot'),
                                  'mesh.fsdp': 2, 'train.checkpoint_every': 7})
    changed = resume_rules.check_resume(saved, new, 10, '/w')
    assert changed == {'train.steps': (100, 500), 'train.log_every': (10, 5),
                       'eval.evaluators': (['retrieval'], ['retrieval', 'zero_shot']),
                       'mesh.fsdp': (1, 2), 'train.checkpoint_every': (50, 7)}


def test_a_deliberate_change_passes_when_named():
    saved, new = saved_and_new(**{'optim.lr': 1e-4,
                                  'train.resume_allow_changes': ('optim.lr',)})
    assert resume_rules.check_resume(saved, new, 10, '/w')['optim.lr'] == (1e-3, 1e-4)


def test_keys_added_since_a_checkpoint_pass_at_the_value_that_keeps_its_behaviour():
    saved, new = saved_and_new()
    for key in resume_rules.ADDED_KEYS:  # a checkpoint written before these keys existed
        section, *rest = key.split('.')
        node = saved[section]
        for part in rest[:-1]:
            node = node[part]
        del node[rest[-1]]
        node = new[section]  # the new run asks for the behaviour the old one had
        for part in rest[:-1]:
            node = node[part]
        node[rest[-1]] = resume_rules.ADDED_KEYS[key]
    assert resume_rules.check_resume(saved, new, 4, '/w') == {}
    new['loss']['psd']['soft_weight'] = 'off_diagonal'  # today's default, not the old run's
    with pytest.raises(ValueError, match=r"soft_weight: '<absent>' -> 'off_diagonal'"):
        resume_rules.check_resume(saved, new, 4, '/w')
    new['loss']['psd']['soft_weight'] = 'constant'
    new['model']['act'] = 'gelu'
    with pytest.raises(ValueError, match=r"config.model.act: '<absent>' -> 'gelu'"):
        resume_rules.check_resume(saved, new, 4, '/w')


def test_fewer_steps_than_the_checkpoint_is_refused():
    saved, new = saved_and_new(**{'train.steps': 30})
    with pytest.raises(ValueError, match=r'train.steps=30 is below .* \(40\)'):
        resume_rules.check_resume(saved, new, 40, '/w')


def test_a_second_run_is_refused_and_a_stale_lock_taken_over(tmp_path):
    with workdir.WorkdirLock(tmp_path):
        holder = json.loads((tmp_path / 'lock.json').read_text())
        assert holder['pid'] == os.getpid() and holder['host'] == socket.gethostname()
        with pytest.raises(workdir.WorkdirLocked, match=f'in use by pid {os.getpid()}'):
            workdir.WorkdirLock(tmp_path).acquire()
    assert not (tmp_path / 'lock.json').exists()
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    (tmp_path / 'lock.json').write_text(json.dumps({'host': socket.gethostname(),
                                                    'pid': dead.pid, 'started': 'earlier'}))
    with workdir.WorkdirLock(tmp_path) as lock:
        assert lock.held
    (tmp_path / 'lock.json').write_text(json.dumps({'host': 'another-host', 'pid': 1,
                                                    'started': 'earlier'}))
    with pytest.raises(workdir.WorkdirLocked, match='host another-host'):
        workdir.WorkdirLock(tmp_path).acquire()


@pytest.mark.parametrize('content', [b'', b'{"host": "h", "pi', b'\xff\xfe garbage', b'[]'])
def test_an_empty_or_corrupt_lock_is_taken_over_naming_the_file(tmp_path, content, caplog):
    """A lock file that holds no lock (a crash while writing it) is stale: taken over, with a
    warning naming the file, instead of blocking the workdir for ever."""
    (tmp_path / 'lock.json').write_bytes(content)
    with caplog.at_level('WARNING'), workdir.WorkdirLock(tmp_path) as lock:
        assert lock.held
        assert json.loads((tmp_path / 'lock.json').read_text())['pid'] == os.getpid()
    assert str(tmp_path / 'lock.json') in caplog.text and 'taking it over' in caplog.text
    assert not (tmp_path / 'lock.json').exists()


def test_broken_embeddings_never_rank_above_chance(rng):
    """Ties and NaN scores count as misses: a constant or NaN model retrieves nothing and
    classifies nothing (chance or below), where counting `scores > best` gave it R@1 = 1."""
    n, d = 50, 8
    for broken in (np.full((n, d), np.nan, np.float32), np.ones((n, d), np.float32)):
        result = retrieval_metrics(broken, broken)
        assert result['i2t_R@1'] == result['t2i_R@1'] == 0.0
        assert result['i2t_R@10'] == result['t2i_R@10'] == 0.0
        top = zero_shot_metrics(broken, rng.integers(0, 10, n), broken[:10])
        assert top['top1'] == 0.0 and top['top5'] == 0.0
    good = rng.standard_normal((n, d)).astype(np.float32)
    good /= np.linalg.norm(good, axis=1, keepdims=True)
    assert retrieval_metrics(good, good)['i2t_R@1'] == 1.0


def test_a_failing_evaluator_keeps_the_results_of_the_others(monkeypatch):
    from psd_jax.evaluation import run as evaluation

    def broken(*args):
        raise ValueError('the probe data is unreadable')

    monkeypatch.setitem(evaluation.EVALUATORS, 'retrieval', lambda *a: {'i2t_R@1': 0.25})
    monkeypatch.setitem(evaluation.EVALUATORS, 'linear_probe', broken)
    config = config_lib.base_config()
    config.eval.evaluators = ('linear_probe', 'retrieval')
    with pytest.raises(evaluation.EvaluationFailed, match='linear_probe: the probe data') as e:
        evaluation.run_evaluators(config, None, None, None, None)
    assert e.value.partial == {'eval/retrieval/i2t_R@1': 0.25}


def test_evaluators_refuse_non_finite_embeddings(rng):
    from psd_jax.evaluation import run as evaluation

    good = rng.standard_normal((6, 4))
    evaluation.check_finite({'image': good, 'text': good}, 'emoji split twitter')
    bad = good.copy()
    bad[2, 1] = np.nan
    bad[4, 0] = np.inf
    with pytest.raises(evaluation.NonFiniteEmbeddings, match='twitter: 2 of 6 text'):
        evaluation.check_finite({'image': good, 'text': bad}, 'emoji split twitter')


def test_own_data_split_names_are_checked_before_anything_is_prepared(tmp_path):
    (tmp_path / 'mine' / 'train').mkdir(parents=True)
    (tmp_path / 'mine' / 'val').mkdir()
    config = config_lib.base_config()  # the emoji splits: google / twitter
    config.data.dataset = 'image_text_shards'
    config.data.path = str(tmp_path / 'mine')
    with pytest.raises(ValueError, match=r"config.data.train_split: 'google': .* give the "
                                         r"splits \['train', 'validation'\]"):
        config_lib.check_own_data(config)
    config.data.train_split = 'train'
    with pytest.raises(ValueError, match=r"config.eval.split: 'twitter'"):
        config_lib.check_own_data(config)
    config.eval.split = 'validation'
    config_lib.check_own_data(config)
    config.data.path = str(tmp_path / 'nothing')
    with pytest.raises(ValueError, match='config.data.path: .*nothing is not a directory'):
        config_lib.check_own_data(config)


@pytest.mark.parametrize('kind', ['clip', 'psd', 'sigmoid'])
def test_a_non_finite_step_is_not_applied_and_is_counted(devices, kind):
    """The guard inside the step, for every loss kind (psd: the default EMA teacher): a finite
    step changes parameters and optimizer state; a step whose loss is NaN (one parameter
    poisoned) leaves every array as it was (parameters, optimizer state, the EMA teacher), bit
    for bit, and advances only the step counter and the skip counters."""
    import jax

    from psd_jax import sharding
    from psd_jax.training import batch as batch_lib, step

    config = config_lib.base_config()
    config.loss.kind, config.data.global_batch = kind, 8
    mesh = sharding.make_mesh({'data': 1}, devices[:1])
    setup = config_lib.step_setup(config, mesh)
    spec = step.batch_spec(setup, 8)
    batch = batch_lib.synthetic(spec, np.random.default_rng(0), config.model.vocab_size)
    fn = jax.jit(lambda s, b: step.train_step(setup, s, b))
    state = step.init_state(setup, jax.random.key(0))
    applied, metrics = fn(state, batch)
    assert float(metrics['skipped']) == 0.0 and int(applied.step) == 1
    assert not np.array_equal(applied.params['logit_scale'], state.params['logit_scale'])
    poisoned = applied.replace(params={**applied.params, 'logit_scale': jax.numpy.full(
        (), np.nan, np.float32)})
    kept, metrics = fn(poisoned, batch)
    kept, metrics = fn(kept, batch)
    assert float(metrics['skipped']) == 1.0 and not np.isfinite(float(metrics['loss']))
    assert int(kept.step) == 3
    assert {k: int(v) for k, v in kept.health.items()} == {'skipped_in_a_row': 2,
                                                            'skipped_total': 2}
    assert (kept.ema_params is None) == (kind != 'psd')
    for want, got in zip(jax.tree.leaves((poisoned.params, poisoned.opt_state,
                                          poisoned.ema_params)),
                         jax.tree.leaves((kept.params, kept.opt_state, kept.ema_params))):
        np.testing.assert_array_equal(np.asarray(want), np.asarray(got))


def test_an_update_larger_than_the_parameters_is_not_applied(devices):
    """The divergence rule inside the step: at a learning rate of 100 the first AdamW update is
    many times the parameters' norm; it is skipped (every array kept, bit for bit) under the
    default bound, and applied when the bound is switched off (train.max_update_ratio=0)."""
    import jax

    from psd_jax import sharding
    from psd_jax.training import batch as batch_lib, step

    config = config_lib.base_config()
    config.loss.kind, config.data.global_batch = 'clip', 8
    config.optim.lr, config.optim.warmup_steps = 100.0, 0
    mesh = sharding.make_mesh({'data': 1}, devices[:1])
    spec = None
    results = {}
    for bound in (1.0, 0.0):
        config.train.max_update_ratio = bound
        setup = config_lib.step_setup(config, mesh)
        spec = spec or step.batch_spec(setup, 8)
        batch = batch_lib.synthetic(spec, np.random.default_rng(1), config.model.vocab_size)
        state = step.init_state(setup, jax.random.key(0))
        after, metrics = jax.jit(lambda s, b, setup=setup: step.train_step(setup, s, b))(
            state, batch)
        results[bound] = (state, after, {k: float(v) for k, v in metrics.items()})
    state, after, metrics = results[1.0]
    assert metrics['update_ratio'] > 1 and np.isfinite(metrics['loss'])
    assert metrics['skipped'] == 1.0 and metrics['skipped_in_a_row'] == 1.0
    for want, got in zip(jax.tree.leaves(state.params), jax.tree.leaves(after.params)):
        np.testing.assert_array_equal(np.asarray(want), np.asarray(got))
    state, after, metrics = results[0.0]
    assert metrics['skipped'] == 0.0 and metrics['update_ratio'] > 1
    assert not np.array_equal(np.asarray(state.params['logit_scale']),
                              np.asarray(after.params['logit_scale']))
    norm = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                       for x in jax.tree.leaves(state.params)))
    np.testing.assert_allclose(metrics['param_norm'], norm, rtol=1e-5)
