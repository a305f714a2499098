"""psd_jax's train step against open_clip's, same architecture, batch and precision.

    scripts/make_open_clip_env.sh                      # once: torch + open_clip in their own venv
    python benchmarks/vs_open_clip.py [--cases small vitb32] [--rounds 3] [--steps 5]
        [--venv ~/.cache/psd_jax/open_clip_venv] [--out benchmarks/results/vs_open_clip.json]

One step is what each tool does per training step: forward of both towers, the CLIP loss,
backward, gradient clipping (norm 1) and AdamW. Each side runs in its own process (open_clip in
the venv's Python, psd_jax in this one), alternated --rounds times so drifts in machine load
hit both alike; a process warms up (compiles) and then times --repeats blocks of --steps steps,
and reports its median block. The table shows the median over rounds and the ratio psd_jax /
open_clip (below 1: psd_jax is faster). Inputs are what each tool's pipeline hands its step:
uint8 pixels for psd_jax (normalised on the device), float32 normalised tensors for open_clip.
Before timing a case, both sides compute the loss of the same initial weights on the same batch
(in float32, at most 64 examples): open_clip's freshly initialised model is written as an
open_clip folder, imported through psd_jax.pretrained (what a user's import does), and both
losses must agree within --same_loss_rtol; the JSON records the two losses. Cases:

    small    ViT width 256, depth 4, patch 8, 64 px; text width 256, depth 4, context 32; batch 64
    vitb32   ViT-B/32 (OpenAI's architecture, quick GELU), 224 px, context 77; batch 16
    vitb16   ViT-B/16 in bfloat16 (open_clip: autocast amp_bf16), for GPUs; --batch sets it
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
VENV = pathlib.Path.home() / '.cache' / 'psd_jax' / 'open_clip_venv'
# embed, image (size, patch, width, depth, heads), text (context, width, depth, heads), batch
CASES = {
    'small': dict(embed=256, image=(64, 8, 256, 4, 4), text=(32, 256, 4, 4), batch=64,
                  dtype='float32'),
    'vitb32': dict(embed=512, image=(224, 32, 768, 12, 12), text=(77, 512, 12, 8), batch=16,
                   dtype='float32'),
    'vitb16': dict(embed=512, image=(224, 16, 768, 12, 12), text=(77, 512, 12, 8), batch=256,
                   dtype='bfloat16'),
}
VOCAB = 49408


def psd_jax_step(case: dict) -> dict:
    """psd_jax's compiled train step (loss.kind clip) for `case` on one device, with its
    initial state and a device-resident batch: {'fn', 'state', 'batch'}."""
    import jax
    import numpy as np

    from psd_jax import config as config_lib, models, sharding
    from psd_jax.training import batch as batch_lib, step

    size, patch, width, depth, heads = case['image']
    context, t_width, t_depth, t_heads = case['text']
    models.PRESETS['bench'] = models.ModelSpec(
        embed_dim=case['embed'], image_size=size, context_length=context, text_width=t_width,
        text_depth=t_depth, text_heads=t_heads,
        image=dict(kind='vit', patch_size=patch, width=width, depth=depth, heads=heads))
    config = config_lib.base_config()
    config.model.preset, config.model.image_size = 'bench', size
    config.model.context_length, config.model.dtype = context, case['dtype']
    config.loss.kind, config.data.global_batch = 'clip', case['batch']
    if case['dtype'] == 'bfloat16':
        config.loss.precision = 'bfloat16'
        config.model.attention = 'cudnn' if jax.default_backend() == 'gpu' else 'xla'
    mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'model': 1}, jax.devices()[:1])
    setup = config_lib.step_setup(config, mesh)
    shardings = step.state_shardings(setup, config.param_sharding)
    spec = step.batch_spec(setup, case['batch'])
    batch = batch_lib.synthetic(spec, np.random.default_rng(0), VOCAB)
    return {'fn': step.compile_train_step(setup, shardings, spec),
            'state': step.init_state(setup, jax.random.key(0), config.param_sharding),
            'batch': batch, 'put': lambda b: jax.device_put(b, sharding.batch_sharding(mesh)),
            'shardings': shardings, 'scan_layers': config.model.scan_layers}


def psd_jax_worker(case: dict, steps: int, repeats: int, warmup: int) -> dict:
    """Times psd_jax's compiled train step (loss.kind clip) on one device."""
    import jax

    run = psd_jax_step(case)
    from timing import time_blocks
    _, times, metrics = time_blocks(run['fn'], run['state'], run['put'](run['batch']), warmup,
                                    steps, repeats)
    return {'device': jax.devices()[0].device_kind, 'loss': float(metrics['loss']),
            'block_s': times}


def open_clip_worker(case: dict, steps: int, repeats: int, warmup: int) -> dict:
    """Times open_clip's training step as its train loop runs it (ClipLoss, clip_grad_norm_,
    AdamW; autocast to bfloat16 for bfloat16 cases)."""
    import contextlib

    import open_clip
    import torch

    size, context = case['image'][0], case['text'][0]
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    model = open_clip.CLIP(**open_clip_cfg(case)).to(device).train()
    loss_fn = open_clip.ClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6,
                                  weight_decay=0.2)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(case['batch'], 3, size, size, generator=gen).to(device)
    texts = torch.randint(1, VOCAB, (case['batch'], context), generator=gen).to(device)
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)
                ) if case['dtype'] == 'bfloat16' else contextlib.nullcontext

    def train_step():
        optimizer.zero_grad()
        with autocast():
            image_features, text_features, logit_scale = model(images, texts)
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss

    def sync():
        if device == 'cuda':
            torch.cuda.synchronize()

    for _ in range(warmup):
        loss = train_step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            loss = train_step()
        sync()
        times.append((time.perf_counter() - start) / steps)
    kind = torch.cuda.get_device_name() if device == 'cuda' else 'cpu'
    return {'device': kind, 'loss': float(loss), 'block_s': times,
            'versions': {'open_clip': open_clip.__version__, 'torch': torch.__version__}}


def open_clip_cfg(case: dict) -> dict:
    """open_clip's model config of `case` (the `model_cfg` of an open_clip folder)."""
    size, patch, width, depth, heads = case['image']
    context, t_width, t_depth, t_heads = case['text']
    return dict(embed_dim=case['embed'], quick_gelu=True,
                vision_cfg=dict(image_size=size, patch_size=patch, width=width, layers=depth,
                                head_width=width // heads),
                text_cfg=dict(context_length=context, vocab_size=VOCAB, width=t_width,
                              heads=t_heads, layers=t_depth))


def check_case(case: dict) -> dict:
    """The case the same-loss check computes: float32 (so that equal computations agree to
    rounding whatever dtype the case times in) and at most 64 examples."""
    return dict(case, dtype='float32', batch=min(case['batch'], 64))


def check_batch(case: dict, folder: pathlib.Path) -> None:
    """The batch both sides compute the loss of: uint8 images (B, S, S, 3), token ids (B, L)."""
    import numpy as np
    rng = np.random.default_rng(1)
    size, context, batch = case['image'][0], case['text'][0], case['batch']
    np.savez(folder / 'batch.npz', image=rng.integers(0, 256, (batch, size, size, 3), np.uint8),
             text=rng.integers(1, VOCAB, (batch, context)).astype(np.int32))


def open_clip_loss(case: dict, folder: pathlib.Path) -> dict:
    """open_clip's initial model (seed 0) written to `folder`/model as an open_clip folder, and
    its ClipLoss on the batch in `folder` (pixels normalised as open_clip's transform does)."""
    import numpy as np
    import open_clip
    import torch
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = open_clip.CLIP(**open_clip_cfg(case)).eval()
    (folder / 'model').mkdir()
    (folder / 'model' / 'open_clip_config.json').write_text(
        json.dumps({'model_cfg': open_clip_cfg(case)}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / 'model' / 'open_clip_model.safetensors'))
    data = np.load(folder / 'batch.npz')
    pixels = (data['image'].astype(np.float32) / 255 - np.float32(OPENAI_DATASET_MEAN)
              ) / np.float32(OPENAI_DATASET_STD)
    with torch.no_grad():
        features = model(torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()),
                         torch.from_numpy(data['text'].astype(np.int64)))
        loss = open_clip.ClipLoss()(*features)
    return {'loss': float(loss)}


def psd_jax_loss(case: dict, folder: pathlib.Path) -> dict:
    """psd_jax's loss (the train step's `loss` metric, computed before its update) on the
    batch in `folder` with open_clip's weights imported through psd_jax.pretrained."""
    import numpy as np

    from psd_jax import pretrained
    run = psd_jax_step(case)
    variables, _ = pretrained.load(folder / 'model')
    state = pretrained.into_state(run['state'], variables, run['shardings'], run['scan_layers'])
    data = np.load(folder / 'batch.npz')
    batch = dict(run['batch'], image=data['image'], text=data['text'])
    _, metrics = run['fn'](state, run['put'](batch))
    return {'loss': float(metrics['loss'])}


def same_loss(case_name: str, args) -> dict:
    """Both sides' loss of the same weights and batch; refuses to time a case where they
    differ by more than --same_loss_rtol (the two steps would not be the same computation)."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        check_batch(check_case(dict(CASES[case_name],
                                    **({'batch': args.batch} if args.batch else {}))), folder)
        losses = {side: run_worker(side, case_name, args, ['--check', str(folder)])['loss']
                  for side in ('open_clip', 'psd_jax')}
    rel = abs(losses['psd_jax'] - losses['open_clip']) / abs(losses['open_clip'])
    result = {'psd_jax_loss': losses['psd_jax'], 'open_clip_loss': losses['open_clip'],
              'relative_difference': rel, 'rtol': args.same_loss_rtol}
    print(f'{case_name} same weights, same batch: loss psd_jax {losses["psd_jax"]:.6f}, '
          f'open_clip {losses["open_clip"]:.6f} (relative difference {rel:.1e})', flush=True)
    if not rel <= args.same_loss_rtol:
        raise SystemExit(f'case {case_name}: the two losses differ by {rel:.1e} of open_clip\'s '
                         f'(above --same_loss_rtol={args.same_loss_rtol}): not the same '
                         'computation, so the timing would compare different things')
    return result


def run_worker(side: str, case_name: str, args, extra: tuple = ()) -> dict:
    """One worker process (timing, or with --check the loss check); returns its JSON answer
    (the last line of its stdout)."""
    python = str(args.venv / 'bin' / 'python') if side == 'open_clip' else sys.executable
    command = [python, __file__, '--worker', side, '--cases', case_name, '--steps',
               str(args.steps), '--repeats', str(args.repeats), '--warmup', str(args.warmup)]
    if args.batch:
        command += ['--batch', str(args.batch)]
    command += list(extra)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL='3')
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f'{side} worker for case {case_name} failed:\n{done.stderr[-3000:]}')
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(rows: list[dict], args) -> None:
    """Prints the table and writes the JSON (with its provenance) to --out."""
    print(f'\nmedian of {args.rounds} rounds (each: median of {args.repeats} blocks of '
          f'{args.steps} steps)')
    print(f'{"case":>8} {"batch":>6} {"dtype":>9} {"psd_jax ms":>11} {"open_clip ms":>13} '
          f'{"ratio":>6} {"psd_jax img/s":>14} {"open_clip img/s":>16}')
    for row in rows:
        print(f'{row["case"]:>8} {row["batch"]:>6} {row["dtype"]:>9} {row["psd_jax_ms"]:>11.1f} '
              f'{row["open_clip_ms"]:>13.1f} {row["ratio"]:>6.3f} '
              f'{row["psd_jax_images_per_s"]:>14.1f} {row["open_clip_images_per_s"]:>16.1f}')
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from psd_jax import provenance
    out.write_text(json.dumps({**provenance.record('python benchmarks/vs_open_clip.py'),
                               'rows': rows}, indent=1))
    print(f'wrote {out}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--cases', nargs='+', default=['small', 'vitb32'], choices=list(CASES))
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--steps', type=int, default=5, help='steps per timed block')
    parser.add_argument('--repeats', type=int, default=3, help='timed blocks per process')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--batch', type=int, default=0, help='override the case\'s batch')
    parser.add_argument('--venv', type=pathlib.Path, default=VENV)
    parser.add_argument('--same_loss_rtol', type=float, default=1e-4,
                        help='largest relative difference of the two initial losses')
    parser.add_argument('--worker', choices=['psd_jax', 'open_clip'], help=argparse.SUPPRESS)
    parser.add_argument('--check', type=pathlib.Path, help=argparse.SUPPRESS)
    parser.add_argument('--out', default=str(ROOT / 'benchmarks' / 'results' /
                                             'vs_open_clip.json'))
    args = parser.parse_args()
    if args.worker:
        case = dict(CASES[args.cases[0]], **({'batch': args.batch} if args.batch else {}))
        if args.check:
            work = psd_jax_loss if args.worker == 'psd_jax' else open_clip_loss
            print(json.dumps(work(check_case(case), args.check)))
            return
        work = psd_jax_worker if args.worker == 'psd_jax' else open_clip_worker
        print(json.dumps(work(case, args.steps, args.repeats, args.warmup)))
        return
    if not (args.venv / 'bin' / 'python').exists():
        raise SystemExit(f'--venv {args.venv}: no Python there; create the open_clip '
                         'environment with scripts/make_open_clip_env.sh first')
    rows = []
    for name in args.cases:
        check = same_loss(name, args)
        runs = {'psd_jax': [], 'open_clip': []}
        for r in range(args.rounds):
            for side in runs:
                answer = run_worker(side, name, args)
                runs[side].append(answer)
                print(f'{name} round {r + 1}/{args.rounds} {side}: '
                      f'{1e3 * statistics.median(answer["block_s"]):.1f} ms/step '
                      f'on {answer["device"]}', flush=True)
        ms = {side: 1e3 * statistics.median(statistics.median(a['block_s']) for a in answers)
              for side, answers in runs.items()}
        batch = args.batch or CASES[name]['batch']
        rows.append({'case': name, 'batch': batch, 'dtype': CASES[name]['dtype'],
                     'device': runs['psd_jax'][0]['device'],
                     'psd_jax_ms': ms['psd_jax'], 'open_clip_ms': ms['open_clip'],
                     'ratio': ms['psd_jax'] / ms['open_clip'],
                     'psd_jax_images_per_s': 1e3 * batch / ms['psd_jax'],
                     'open_clip_images_per_s': 1e3 * batch / ms['open_clip'],
                     'versions': runs['open_clip'][0]['versions'], 'same_loss': check,
                     'runs': runs})
    report(rows, args)


if __name__ == '__main__':
    main()
