"""Write notebooks/psd_jax_colab.ipynb (clean, no outputs): python scripts/make_colab_notebook.py"""

import nbformat as nbf

cells = []
md = lambda s: cells.append(nbf.v4.new_markdown_cell(s))
code = lambda s: cells.append(nbf.v4.new_code_cell(s))

md("""# psd_jax on Colab: Progressive Self-Distillation on emoji

Trains the demo config (a tiny ViT + text transformer, PSD with an EMA teacher) on the
Google-style emoji with their English names, then evaluates on the Twitter-style emoji, which it
never saw: retrieval and zero-shot classification. Uses the runtime's accelerator when there is
one (Runtime > Change runtime type); a CPU runtime finishes in about 5 minutes.

Set `PSD_JAX_NOTEBOOK_STEPS` to train for fewer steps (the project's CI runs this notebook with 20).""")
code("""# Install psd_jax from its repository (skipped when it is already importable, as in CI).
import importlib.util, os, subprocess, sys
REPO = os.environ.get('PSD_JAX_REPO', '')  # the git URL of the psd_jax repository you use
if importlib.util.find_spec('psd_jax') is None:
    if not REPO:
        raise SystemExit('Set REPO (or $PSD_JAX_REPO) to the psd_jax repository URL first.')
    subprocess.run(['git', 'clone', '--depth', '1', REPO, 'psd_jax'], check=True)
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '-e', 'psd_jax'], check=True)
    sys.path.insert(0, 'psd_jax')""")
code("""# Real data, fetched once into ~/.cache/psd_jax: emoji artwork + names (npm) and CLIP's BPE vocabulary.
from psd_jax.data import fetch
print(fetch.emoji_sources(), fetch.clip_vocab(), sep='\\n')""")
code("""import importlib.util, json, pathlib, tempfile
import jax
from psd_jax.training import train

spec = importlib.util.find_spec('psd_jax')
root = pathlib.Path(spec.origin).resolve().parents[1]
config_spec = importlib.util.spec_from_file_location('demo', root / 'configs' / 'demo.py')
demo = importlib.util.module_from_spec(config_spec); config_spec.loader.exec_module(demo)
config = demo.get_config()
steps = int(os.environ.get('PSD_JAX_NOTEBOOK_STEPS', config.train.steps))
config.train.steps = steps
config.train.log_every = max(1, min(config.train.log_every, steps // 4))
config.train.checkpoint_every = steps
config.train.eval_every = 0
config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 2)
workdir = pathlib.Path(tempfile.mkdtemp(prefix='psd_demo_'))
print(jax.devices())
final = train.train_and_evaluate(config, str(workdir))
print(json.dumps({k: round(v, 4) for k, v in final.items() if k.startswith('eval/')}, indent=1))""")
md("## Training curves")
code("""import matplotlib.pyplot as plt
from psd_jax.training.metrics import read_metrics
records = [r for r in read_metrics(workdir / 'metrics.jsonl') if 'loss' in r]
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
for key in ('loss', 'clip', 'distill'):
    axes[0].plot([r['step'] for r in records], [r[key] for r in records], label=key)
axes[0].legend(); axes[0].set_xlabel('step')
axes[1].plot([r['step'] for r in records], [r['alpha'] for r in records]); axes[1].set_title('alpha')
plt.show()""")
md("## What the model retrieves for held-out emoji")
code("""import numpy as np
from psd_jax import config as config_lib, sharding
from psd_jax.persistence import checkpointing
from psd_jax.training import step
from psd_jax.data import transforms
from psd_jax.data.from_config import eval_loader, make_tokenizer, open_split
from psd_jax.evaluation.embed import embed_batches

mesh = sharding.make_mesh(config.mesh.to_dict())
setup = config_lib.step_setup(config, mesh)
ckpt = checkpointing.Checkpointer(workdir, asynchronous=False)
state, _ = ckpt.restore(step.abstract_state(setup, step.state_shardings(setup)), None)
ckpt.close()
variables = {'params': state.params, 'batch_stats': state.batch_stats}
tokenizer = make_tokenizer(config)
source = open_split(config, config.eval.split)
emb = embed_batches(setup.model, variables, eval_loader(config, source, tokenizer), mesh, config.eval.batch)
captions = [source[i]['caption'].decode() for i in range(len(source))]
picks = np.random.default_rng(0).choice(len(source), 6, replace=False)
scores = emb['image'][picks] @ emb['text'].T
fig, axes = plt.subplots(1, 6, figsize=(18, 4))
for ax, i, row in zip(axes, picks, scores):
    ax.imshow(transforms.decode(source[int(i)]['image'])); ax.axis('off')
    top = [captions[j] for j in np.argsort(-row)[:3]]
    ax.set_title(f'true: {captions[i]}\\n' + '\\n'.join(f'{k + 1}. {t}' for k, t in enumerate(top)), fontsize=8)
plt.show()""")
md("## Zero-shot classification into a few emoji groups")
code("""from psd_jax.data import classnames
from psd_jax.evaluation.zero_shot import class_embeddings, zero_shot_metrics
groups = list(classnames.EMOJI_GROUPS)
chosen = ['animals-nature', 'food-drink', 'flags', 'smileys-emotion']
names = [classnames.EMOJI_GROUPS[g] for g in chosen]
classes = class_embeddings(setup.model, variables, tokenizer, names, classnames.templates('emoji'),
                           mesh, config.eval.batch, config.model.context_length)
keep = np.isin(emb['label'], [groups.index(g) for g in chosen])
labels = np.array([chosen.index(groups[l]) for l in emb['label'][keep]])
result = zero_shot_metrics(emb['image'][keep], labels, classes)
print(f"{keep.sum()} held-out emoji, {len(chosen)} groups (chance {1 / len(chosen):.0%}): top-1 {result['top1']:.1%}")
for name, acc in zip(names, result['per_class']):
    print(f'  {name:20s} {acc:.1%}')""")

nb = nbf.v4.new_notebook(cells=cells, metadata={
    'kernelspec': {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'},
    'language_info': {'name': 'python'}, 'accelerator': 'GPU'})
import pathlib
nbf.write(nb, str(pathlib.Path(__file__).resolve().parents[1] / 'notebooks' / 'psd_jax_colab.ipynb'))
