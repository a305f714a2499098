"""The Markdown tables of README.md and docs/, each written from a stored results JSON.

Each function takes the repository root and returns one generated block (a table and the line
that names its source: the JSON, its commit, date, machine and command), so that the docs say
which code state every figure describes. benchmarks/render.py puts the blocks into the docs.
"""

from __future__ import annotations

import json
import pathlib
import re
import statistics

GIB = 2 ** 30


def load(root: pathlib.Path, name: str) -> dict:
    """A results JSON by its path relative to the repository root."""
    return json.loads((root / name).read_text())


def source(name: str, result: dict) -> str:
    """The line under a table naming where its figures come from."""
    machine = f', {result["machine"]}' if result.get('machine') else ''
    return (f'<sub>From `{name}`: commit {result["commit"]}, {result["date"]}{machine}; '
            f'`{result["command"]}`.</sub>')


def pct(x: float, digits: int = 1) -> str:
    return f'{100 * x:.{digits}f}%'


def table(header: list[str], align: str, rows: list[list[str]]) -> str:
    """A Markdown table; `align` has one character per column: 'l' or 'r'."""
    marks = ['---:' if a == 'r' else '---' for a in align]
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(marks) + '|']
    return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows])


def demo(root: pathlib.Path) -> str:
    """README's demo table: retrieval both ways, zero-shot and wall time of configs/demo.py."""
    name = 'benchmarks/results/demo_wall_time.json'
    result = load(root, name)
    runs = result['runs']['current']
    m = runs[0]['metrics']
    same = all(r['metrics'] == m for r in runs)
    rows = []
    for label, d in (('image -> caption', 'i2t'), ('caption -> image', 't2i')):
        g = lambda k: m[f'eval/retrieval/{d}_{k}']  # noqa: E731
        rows.append([label, pct(g('R@1')), pct(g('R@5')), pct(g('R@10')),
                     f'{g("median_rank"):.0f}', '0.05%'])
    seconds = ' / '.join(f'{r["seconds"]:.0f}' for r in runs)
    return '\n'.join([
        table(['evaluation', 'R@1', 'R@5', 'R@10', 'median rank', 'chance R@1'], 'lrrrrr',
              rows), '',
        f'Zero-shot into the 10 emoji groups: top-1 {pct(m["eval/zero_shot/top1"])} (chance '
        f'10%), top-5 {pct(m["eval/zero_shot/top5"])} (chance 50%). Wall time, start to final '
        f'metrics, data already fetched: median {result["median_s"]["current"]:.0f} s of '
        f'{len(runs)} runs ({seconds} s)' + (', each with these metrics.' if same else
                                             '; metrics of the first run.'),
        '', source(name, result)])


def suite(root: pathlib.Path) -> str:
    """README's table of the demo suite on the demo's final checkpoint."""
    name = 'docs/results/demo_suite.json'
    result = load(root, name)
    rows = [[b['name'], b['task'], b['data'], b['headline_metric'], pct(b['headline'], 2),
             f'{b["images"]:,}'] for b in result['benchmarks']]
    rows.append([f'**average** ({len(result["benchmarks"])})', '', '', '',
                 f'**{pct(result["average"], 2)}**', ''])
    return '\n'.join([table(['benchmark', 'task', 'data', 'metric', 'value', 'images'],
                            'llllrr', rows), '', source(name, result)])


def step_time(root: pathlib.Path, name: str = 'benchmarks/results/step_time.json',
              patch_dropout: bool = False) -> str:
    """README's cost of PSD (the teacher variants) or of patch dropout (`patch_dropout`): ms
    per train step of each variant and its ratio to CLIP's in the same run."""
    result = load(root, name)
    rows = [[r['variant'], f'{r["ms_per_step"]:.1f}', f'{r["ratio_to_clip"]:.3f}']
            for r in result['rows'] if patch_dropout or 'patch_dropout' not in r['variant']]
    return '\n'.join([table(['variant', 'ms/step', 'vs CLIP'], 'lrr', rows), '',
                      source(name, result)])


def loss_memory(root: pathlib.Path) -> str:
    """docs/performance.md: GiB of compiled loss temporaries per device, by scheme."""
    name = 'benchmarks/results/loss_memory.json'
    result = load(root, name)
    rows = []
    for r in result['rows']:
        gather, ring = r['all_gather_temp_bytes_per_device'], r['ring_temp_bytes_per_device']
        replicated = r.get('replicated_temp_bytes_per_device')
        rows.append([f'{r["batch"]:,}', str(r['dim']), r['loss'], f'{gather / GIB:.3f}',
                     f'{ring / GIB:.3f}', '-' if replicated is None else
                     f'{replicated / GIB:.3f}', f'{gather / ring:.1f}'])
    largest = max(r['batch'] for r in result['rows'])
    at = {(r['loss'], r['dim']): r for r in result['rows'] if r['batch'] == largest}
    dim = max(d for _, d in at)
    summary = ', '.join(f'{loss} {at[(loss, dim)]["ring_temp_bytes_per_device"] / GIB:.2f} GiB'
                        for loss, d in at if d == dim)
    return '\n'.join([table(['B', 'D', 'loss', 'all_gather', 'ring',
                             'replicated (one device holds B x B)', 'all_gather / ring'],
                            'rrlrrrr', rows), '',
                       f'At B = {largest:,}, D = {dim}, the ring needs: {summary} per device.',
                       '', source(name, result)])


CONFIGS = {'psd_cc12m_vitb16': 'ViT-B/16, PSD, EMA teacher', 'psd_yfcc15m_rn50':
           'RN50, PSD, EMA teacher', 'psd_cc3m_vitb32': 'ViT-B/32, PSD, EMA teacher',
           'clip_cc3m_vitb32': 'ViT-B/32, CLIP'}


def fit_own(root: pathlib.Path) -> str:
    """docs/performance.md: each paper config compiled at its own batch for its TPU slice."""
    name = 'benchmarks/results/fit.json'
    run = load(root, name)['runs']['own_batch']
    rows = []
    for f in run['fit']:
        slice_, devices = re.match(r'(\S+) \((\d+)', f['topology']).groups()
        rows.append([f'{f["config"]} ({CONFIGS.get(f["config"], "")})', f'{slice_} ({devices})',
                     f'{f["own_batch"]:,}', f'{f["own_total_gib"]:.2f}',
                     'yes' if f['own_fits'] else 'no', f'{f["own_model_tflop_per_device"]:.2f}'])
    return '\n'.join([table(['config', 'slice (devices)', 'global batch', 'GiB per device (of 32)',
                             'fits', 'model TFLOP per device'], 'llrrlr', rows), '',
                      source(name, run)])


def refused_batch(attempt: dict) -> str:
    """'163,840 (37.94G)': a batch the compiler refused and the temporaries it asked for."""
    asked = re.search(r'temporaries \((\S+G)\)', attempt['error'])
    return f'{attempt["global_batch"]:,}' + (f' ({asked[1]})' if asked else '')


def fit_levers(root: pathlib.Path) -> str:
    """docs/performance.md: ViT-B/16's largest global batch with each memory lever."""
    name = 'benchmarks/results/fit.json'
    runs = load(root, name)['runs']
    rows, sources = [], []
    for key in ('vitb16_remat_none', 'vitb16_remat_full', 'vitb16_accumulation'):
        sources.append(source(f'{name} ({key})', runs[key]))
        for f in runs[key]['fit']:
            k = f['overrides'].get('train.micro_batches')
            lever = f['lever'].replace('accumulation', f'accumulation (k = {k})')
            tries = sorted(f['tries'], key=lambda t: t['global_batch'])
            fits = [f'{t["global_batch"]:,} ({t["total_gib"]:.2f})' for t in tries
                    if t['error'] is None]
            refused = [refused_batch(t) for t in tries if t['error'] is not None]
            rows.append([lever, f'{f["own_total_gib"]:.2f}', '; '.join(fits) or '-',
                         '; '.join(refused) or '-', f'{f["largest_batch"]:,}'])
    return '\n'.join([table(['lever', 'at 8,192', 'fits: global batch (GiB per device)',
                             'refused (temporaries the compiler asked for)', 'largest found'],
                            'lrllr', rows), ''] + ['<br>'.join(sources)])



def commits(results) -> str:
    """'commit X' or 'commits X, Y': the code states a set of results was measured at."""
    names = sorted({r['commit'] for r in results})
    return ('commit ' if len(names) == 1 else 'commits ') + ', '.join(names)


def fit_summary(root: pathlib.Path) -> str:
    """README's scale paragraph: ViT-B/16 PSD's largest global batch with each lever."""
    name = 'benchmarks/results/fit.json'
    runs = load(root, name)['runs']
    largest = {f['lever']: f['largest_batch'] for key in ('vitb16_remat_none', 'vitb16_remat_full',
                                                          'vitb16_accumulation')
               for f in runs[key]['fit']}
    k = runs['vitb16_accumulation']['fit'][0]['overrides']['train.micro_batches']
    return (f'On v4-128, ViT-B/16 PSD fits a global batch of {largest["remat none"]:,} without a '
            f'lever, {largest["remat full"]:,} with `model.remat=full`, '
            f'{largest["accumulation"]:,} with accumulation (k = {k}) and '
            f'{largest["accumulation, remat full"]:,} with both (`{name}`, '
            + commits(runs.values()) + ').')

CASES = {'small': 'small ViT (width 256, depth 4, 64 px, patch 8; text 256 x 4, context 32)',
         'vitb32': 'ViT-B/32 (224 px, context 77)', 'vitb16': 'ViT-B/16 (224 px, bfloat16)'}


def vs_open_clip(root: pathlib.Path) -> str:
    """docs/performance.md: psd_jax's train step against open_clip's, after the same-loss
    check."""
    name = 'benchmarks/results/vs_open_clip.json'
    result = load(root, name)
    rows = []
    for r in result['rows']:
        def rounds(side):
            return ' / '.join(f'{1e3 * statistics.median(a["block_s"]):,.1f}'
                              for a in r['runs'][side])
        check = r['same_loss']
        rows.append([CASES.get(r['case'], r['case']), str(r['batch']),
                     f'{check["psd_jax_loss"]:.5f} / {check["open_clip_loss"]:.5f} '
                     f'({check["relative_difference"]:.0e})',
                     f'{r["psd_jax_ms"]:,.1f} ({rounds("psd_jax")})',
                     f'{r["open_clip_ms"]:,.1f} ({rounds("open_clip")})', f'{r["ratio"]:.3f}'])
    return '\n'.join([table(['case', 'batch', 'initial loss psd_jax / open_clip (rel. diff.)',
                             'psd_jax ms/step (rounds)', 'open_clip ms/step (rounds)',
                             'psd_jax / open_clip'], 'lrlllr', rows), '', source(name, result)])


def profile(root: pathlib.Path) -> str:
    """docs/performance.md: where the small case's step time goes, by part of the model."""
    name = 'benchmarks/results/profile_small.json'
    result = load(root, name)
    total = sum(p['matmul_ms'] + p['other_ms'] for p in result['parts'])
    rows = [[p['part'], f'{p["matmul_ms"]:.1f}', f'{p["other_ms"]:.1f}',
             pct((p['matmul_ms'] + p['other_ms']) / total)] for p in result['parts']]
    return '\n'.join([table(['part', 'matmuls ms', 'everything else ms', 'share'], 'lrrr', rows),
                      '', f'Wall time per step: {result["wall_ms_per_step"]:,.1f} ms.', '',
                      source(name, result)])


def input_pipeline(root: pathlib.Path) -> str:
    """README's input pipeline: images/s by image size, grain workers and read-ahead."""
    name = 'benchmarks/results/input_pipeline.json'
    result = load(root, name)

    def key(r):
        return r['image_size'], r['workers'], (r.get('read_threads', 0), r.get('read_ahead', 0))
    value = {key(r): r['images_per_s'] for r in result['rows']}
    reads = sorted({k[2] for k in value})
    workers = sorted({k[1] for k in value})
    header = ['image size'] + [f'{w} worker{"s" * (w != 1)}, read {t},{a}'
                               for (t, a) in reads for w in workers]
    rows = [[str(size)] + [f'{value[(size, w, rd)]:,.0f}' if (size, w, rd) in value else '-'
                           for rd in reads for w in workers]
            for size in sorted({k[0] for k in value})]
    return '\n'.join([table(header, 'r' * len(header), rows), '', source(name, result)])


def prepare_throughput(root: pathlib.Path) -> str:
    """README's data preparation: images/s one process and through Beam's local runner."""
    name = 'benchmarks/results/prepare_throughput.json'
    result = load(root, name)
    rows = [[r['way'], ' / '.join(f'{s:.1f}' for s in r['seconds']),
             f'{r["images_per_s"]:,.0f}'] for r in result['rows']]
    return '\n'.join([table([f'preparing {result["images"]:,} images', 'seconds (runs)',
                              'images/s (median)'], 'lrr', rows), '', source(name, result)])


def flops(root: pathlib.Path) -> str:
    """docs/performance.md: the model's FLOP count against XLA's for one compiled TPU step."""
    name = 'benchmarks/results/flops_psd_cc3m_vitb32_v4-32.json'
    r = load(root, name)
    model, xla = r['model_flops_per_device'] / 1e12, r['flops_per_device'] / 1e12
    return '\n'.join([
        f'{r["devices"]}, global batch {r["global_batch"]:,}: {model:.2f} TFLOP per device by '
        f'the model count, {xla:.2f} by XLA\'s ({r["flops_per_step"] / 1e12:.1f} per step, '
        f'{pct(xla / model, 0)} of the model count); {r["total_gib"]:.2f} GiB per device.', '',
        source(name, r)])



def layers_tpu(root: pathlib.Path) -> str:
    """docs/performance.md: a TPU step's memory with the model's own layers and with each
    swapped for flax's."""
    name = 'benchmarks/results/layers_tpu.json'
    result = load(root, name)
    base = result['rows'][0]
    rows = [[r['variant'], f'{r["total_gib"]:.2f}', f'{r["temp_gib"]:.2f}',
             f'{r["total_gib"] - base["total_gib"]:+.2f}',
             f'{r["flops_per_device"] / 1e12:.2f}', f'{r["compile_s"]:.0f}']
            for r in result['rows']]
    return '\n'.join([
        f'{base["config"]} on {base["topology"]}, global batch {base["global_batch"]:,}:', '',
        table(['layers', 'GiB per device', 'of which temporaries', 'GiB against psd_jax\'s',
               'XLA TFLOP per device', 'compile s'], 'lrrrrr', rows), '',
        source(name, result)])


def dense_vjp(root: pathlib.Path) -> str:
    """docs/design.md: the demo's wall time with and without the removed CPU dense backward."""
    name = 'benchmarks/results/demo_dense_vjp.json'
    r = load(root, name)

    def runs(side):
        return ' / '.join(f'{x["seconds"]:.1f}' for x in r['runs'][side])
    return '\n'.join([table(
        ['demo (configs/demo.py)', 'median s', 'runs s'], 'lrl',
        [[f'with the hand-written CPU weight gradient ({r["baseline_commit"]})',
          f'{r["median_s"]["baseline"]:.1f}', runs('baseline')],
         [f'without it ({r["commit"]})', f'{r["median_s"]["current"]:.1f}', runs('current')]]),
        '', source(name, r)])


PROTOCOL = 'docs/results/protocol.json'
SETTINGS = {
    'psd_ema-offdiag_x2': '**teacher share weighted by its off-diagonal mass (`soft_weight = '
                          'off_diagonal`), temperature x2: the default**',
    'psd_ema-temp_x2': 'constant share, temperature x2 (the previous default)',
    'psd_ema-late_x2': 'constant share, temperature x2, distilling from half-way '
                       '(`alpha_start_step`)',
    'psd_ema-temp_half': 'constant share, teacher sharper than the student (temperature x0.5)'}
CONDITIONS = {'emoji_clean': 'emoji, clean', 'emoji_shuffle_0.4': 'emoji, 40% shuffled',
              'emoji_within_group_0.4': 'emoji, 40% swapped in subgroup',
              'emoji_styles_clean': 'emoji_styles, clean',
              'emoji_styles_shuffle_0.4': 'emoji_styles, 40% shuffled',
              'fashion_clean': 'Fashion-MNIST, clean',
              'fashion_shuffle_0.5': 'Fashion-MNIST, 50% shuffled'}


def signed(x: float) -> str:
    return f'{100 * x:+.1f}'


def protocol_ranking(root: pathlib.Path) -> str:
    """README's selection protocol: each candidate's worst and mean difference to CLIP."""
    result = load(root, PROTOCOL)
    rows = []
    for key, s in sorted(result['summary'].items(), key=lambda kv: -kv[1]['worst_relative']):
        n = len(s['conditions'])
        rows.append([SETTINGS.get(key, key), f'{signed(s["worst_relative"])}% '
                     f'({CONDITIONS.get(s["worst_condition"], s["worst_condition"])})',
                     f'{signed(s["mean_relative"])}%',
                     f'{s["intervals_above"]} / {s["intervals_below"]} (of {n})'])
    return '\n'.join([table(['candidate (EMA teacher, momentum 0.99, half of each batch, a '
                             'ramped to 0.5)', 'worst relative difference to CLIP',
                             'mean relative difference', 'intervals above / below 0'],
                            'lrrr', rows), '', source(PROTOCOL, result)])


def protocol_default(root: pathlib.Path) -> str:
    """README's selection protocol: the chosen default against CLIP on every condition."""
    result = load(root, PROTOCOL)
    rows = [[CONDITIONS.get(c, c), f'{100 * r["clip"]:.1f}', f'{100 * r["psd"]:.1f}',
             f'{signed(r["diff"])} [{signed(r["low"])}, {signed(r["high"])}]']
            for c, r in result['summary']['psd_ema-offdiag_x2']['conditions'].items()]
    return '\n'.join([table(['condition', 'CLIP', 'PSD (default)', 'PSD - CLIP [95% CI]'],
                             'lrrr', rows), '', source(PROTOCOL, result)])


TABLES = {'demo': demo, 'suite': suite, 'step_time': step_time, 'loss_memory': loss_memory,
          'fit_own': fit_own, 'fit_levers': fit_levers, 'fit_summary': fit_summary,
          'vs_open_clip': vs_open_clip,
          'profile': profile, 'input_pipeline': input_pipeline,
          'prepare_throughput': prepare_throughput, 'flops': flops,
          'layers_tpu': layers_tpu, 'dense_vjp': dense_vjp,
          'protocol_ranking': protocol_ranking, 'protocol_default': protocol_default,
          'step_time_patch_dropout': lambda root: step_time(
              root, 'benchmarks/results/step_time_patch_dropout.json', patch_dropout=True)}
