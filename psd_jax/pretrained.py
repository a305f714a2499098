"""Pretrained CLIP weights as files: read OpenAI / open_clip checkpoints, write open_clip folders.

Reading (`read`): a `.safetensors` file; a PyTorch `.bin` / `.pt` / `.pth` file, when torch is
installed (OpenAI's TorchScript archives included; torch stays optional); or a folder holding
`open_clip_config.json` and its weights (open_clip's `local-dir:` / Hugging Face layout), whose
config gives the activation. Writing (`write_open_clip`): such a folder, which open_clip loads
with `open_clip.create_model_and_transforms('local-dir:FOLDER')`. The tensors are mapped by
psd_jax/models/convert.py.
"""

from __future__ import annotations

import json
import pathlib
import warnings
import zipfile
from typing import Any, Mapping

import numpy as np

from psd_jax.models import ModelSpec, convert, import_checks
from psd_jax.models.clip import CLIP_MEAN, CLIP_STD

CONFIG_NAME = 'open_clip_config.json'
WEIGHTS_NAME = 'open_clip_model.safetensors'
WEIGHT_FILES = (WEIGHTS_NAME, 'open_clip_pytorch_model.safetensors', 'model.safetensors',
                'open_clip_pytorch_model.bin', 'pytorch_model.bin', 'model.pt')


def is_torchscript(path: pathlib.Path) -> bool:
    """Whether a PyTorch file is a TorchScript archive (OpenAI's CLIP releases are): its zip
    holds code/ and constants.pkl, which a torch.save state dict does not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith('/constants.pkl') for n in archive.namelist())


def _torch_state_dict(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ValueError(f'{path}: reading a PyTorch checkpoint needs torch (pip install torch), '
                         'or convert it to .safetensors first') from e
    if is_torchscript(path):  # OpenAI's releases; torch.jit.load warns that it is deprecated
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            loaded = torch.jit.load(str(path), map_location='cpu').state_dict()
    else:
        loaded = torch.load(str(path), map_location='cpu', weights_only=True)
    if isinstance(loaded, dict) and isinstance(loaded.get('state_dict'), dict):
        loaded = loaded['state_dict']  # an open_clip training checkpoint
    return {key: value.float().numpy() if hasattr(value, 'numpy') else np.asarray(value)
            for key, value in loaded.items()}


def _refuse_hf_folder(folder: pathlib.Path) -> None:
    hf_config = folder / 'config.json'
    if not (folder / CONFIG_NAME).is_file() and hf_config.is_file():
        try:
            described = json.loads(hf_config.read_text())
        except ValueError:
            return
        if described.get('model_type') in ('clip', 'siglip') or any(
                'CLIP' in a for a in described.get('architectures') or ()):
            raise ValueError(f'{folder}: a Hugging Face transformers CLIP folder is not '
                             'supported; use the open_clip folder of the same model '
                             f'({CONFIG_NAME} + {WEIGHTS_NAME})')


def read(path: str | pathlib.Path) -> tuple[dict[str, np.ndarray], dict | None]:
    """(state dict as float32 numpy arrays, open_clip model config or None) from a weights
    file or an open_clip folder (the config when one lies beside the weights)."""
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f'model.init_from={str(path)!r}: no such file or folder')
    folder = path if path.is_dir() else path.parent
    _refuse_hf_folder(folder)
    cfg = None
    if (folder / CONFIG_NAME).is_file():
        cfg = json.loads((folder / CONFIG_NAME).read_text()).get('model_cfg')
    if path.is_dir():
        found = [folder / n for n in WEIGHT_FILES if (folder / n).is_file()]
        if not found:
            raise FileNotFoundError(f'{path}: no weights file in it (looked for {WEIGHT_FILES})')
        path = found[0]
    if path.suffix == '.safetensors':
        from safetensors.numpy import load_file
        state_dict = {k: np.asarray(v, np.float32) for k, v in load_file(str(path)).items()}
    elif path.suffix in ('.bin', '.pt', '.pth'):
        state_dict = _torch_state_dict(path)
    else:
        raise ValueError(f'{path}: unknown weights format {path.suffix!r}; allowed: '
                         '.safetensors, .bin, .pt, .pth, or an open_clip folder')
    state_dict = import_checks.clean_keys(state_dict)
    import_checks.check_layout(state_dict, str(path))
    return state_dict, cfg


def load(path: str | pathlib.Path, act: str | None = None,
         heads: tuple[int, int] | None = None) -> tuple[dict, ModelSpec]:
    """({'params', 'batch_stats'} as numpy, the architecture) of a pretrained checkpoint.

    What the tensors do not say comes from the open_clip config beside them, else from the
    caller (the run's config), else the import is refused: `act` (model.act) the activation,
    `heads` (image tower heads, text heads) the attention heads. OpenAI's TorchScript releases
    are quick_gelu. A config that disagrees with `act` is refused naming both; one whose
    forward psd_jax does not compute is refused naming the field."""
    import jax
    from flax import linen as nn

    from psd_jax.training import batch as batch_lib
    from psd_jax.models import build_model

    state_dict, cfg = read(path)
    text_pool = 'argmax'
    if cfg is not None:
        text_pool = import_checks.check_model_cfg(cfg, f'{path} ({CONFIG_NAME})')
        said = 'quick_gelu' if cfg.get('quick_gelu') else 'gelu'
    elif pathlib.Path(path).is_file() and pathlib.Path(path).suffix in (
            '.pt', '.pth', '.bin') and is_torchscript(pathlib.Path(path)):
        said = 'quick_gelu'  # OpenAI's own release: every one of them uses QuickGELU
    else:
        said = None
    if said and act and said != act:
        raise ValueError(f'{path} is a model with activation {said!r} (its {CONFIG_NAME}), but '
                         f'{act!r} was asked for (model.act)')
    if not (said or act):
        raise ValueError(
            f'{path}: nothing says which activation this model uses (no {CONFIG_NAME} beside '
            "it): set model.act ('quick_gelu' for OpenAI's models and open_clip's -quickgelu "
            "ones, 'gelu' for most LAION and DataComp ones, as their open_clip config says)")
    spec = convert.infer_spec(state_dict, said or act, cfg, heads=heads, text_pool=text_pool)
    model = build_model(spec)
    inputs = batch_lib.input_spec(model, 1)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), inputs['image'],
                                          inputs['text']))
    shapes.setdefault('batch_stats', {})
    return convert.import_state_dict(state_dict, spec, shapes), spec


def check_matches(spec: ModelSpec, wanted: ModelSpec, path: str) -> None:
    """Refuse pretrained weights whose architecture is not the config's, naming the fields."""
    if spec == wanted:
        return
    fields = [f for f in ModelSpec.__dataclass_fields__
              if getattr(spec, f) != getattr(wanted, f)]
    diffs = ', '.join(f'{f}: {getattr(spec, f)!r} in the weights, {getattr(wanted, f)!r} in the '
                      f'config' for f in fields)
    name = convert.preset_name(spec)
    hint = (f"; the weights are preset {name!r}" if name else '') + (
        ' (set model.preset, model.image_size, model.context_length, model.vocab_size, '
        'model.embed_dim and model.act to match)')
    raise ValueError(f'model.init_from={path!r} does not fit the config: {diffs}{hint}')


def write_open_clip(folder: str | pathlib.Path, variables: Mapping[str, Any],
                    spec: ModelSpec) -> pathlib.Path:
    """An open_clip folder (config + safetensors) holding psd_jax `variables`."""
    from safetensors.numpy import save_file

    folder = pathlib.Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(convert.export_state_dict(variables, spec), str(folder / WEIGHTS_NAME))
    preprocess = {'mean': list(CLIP_MEAN), 'std': list(CLIP_STD), 'interpolation': 'bicubic',
                  'resize_mode': 'shortest'}
    (folder / CONFIG_NAME).write_text(json.dumps(
        {'model_cfg': convert.open_clip_config(spec), 'preprocess_cfg': preprocess}, indent=1))
    readable = folder.stat().st_mode & 0o666  # as the folder is (safetensors writes 0600)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        (folder / name).chmod(readable | 0o600)
    return folder


def for_config(config: Any, path: str | None = None) -> dict:
    """The variables of `path` (default: config.model.init_from), refused by name unless
    their architecture is the config's model (preset, sizes and activation)."""
    from psd_jax import config as config_lib

    path = path or config.model.init_from
    wanted = config_lib.model_spec(config)
    heads = (wanted.image.get('heads'), wanted.text_heads)
    variables, spec = load(path, act=config.model.act or None, heads=heads)
    check_matches(spec, wanted, path)
    return variables


def _merge(fresh: Any, imported: Mapping[str, Any], where: str = '') -> Any:
    """`fresh` (a parameter dict of device arrays) with every leaf `imported` has replaced by
    it, as a host numpy array; leaves the checkpoint cannot have (a sigmoid loss's logit_bias)
    stay the fresh device arrays. Only shapes are read from `fresh`: nothing leaves the device
    (on a pod, FSDP-sharded arrays could not be fetched whole by one host anyway)."""
    if not isinstance(fresh, Mapping):
        if tuple(fresh.shape) != tuple(np.shape(imported)):
            raise ValueError(f'pretrained {where}: shape {np.shape(imported)}, the model has '
                             f'{np.shape(fresh)}')
        return np.asarray(imported, np.float32)
    extra = set(imported) - set(fresh)
    if extra:
        raise ValueError(f'pretrained weights have {sorted(extra)} under {where or "/"}, which '
                         'the model does not')
    return {k: _merge(v, imported[k], f'{where}/{k}') if k in imported else v
            for k, v in fresh.items()}


def into_state(state: Any, variables: Mapping[str, Any], shardings: Any,
               scan_layers: bool) -> Any:
    """A freshly initialised TrainState with pretrained `variables` as its parameters (and
    BatchNorm statistics, and EMA teacher), placed as `shardings` says; the optimizer state
    stays fresh (its moments are zeros whatever the parameters)."""
    import jax
    import jax.numpy as jnp

    from psd_jax.persistence import layout

    def place(merged, where):  # imported leaves onto their shardings; fresh ones stay
        return jax.tree.map(lambda x, s: jax.device_put(x, s) if isinstance(x, np.ndarray)
                            else x, merged, where)

    params = place(_merge(state.params, layout.convert(variables['params'], scan_layers)),
                   shardings.params)
    batch_stats = state.batch_stats
    if variables.get('batch_stats'):
        batch_stats = place(_merge(state.batch_stats, variables['batch_stats']),
                            shardings.batch_stats)
    ema = None if state.ema_params is None else jax.tree.map(jnp.copy, params)
    return state.replace(params=params, batch_stats=batch_stats, ema_params=ema)
