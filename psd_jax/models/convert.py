"""Pretrained weights in and out: OpenAI CLIP and open_clip state dicts <-> psd_jax parameters.

psd_jax's architectures are OpenAI CLIP's, so every tensor of a state dict has one place in the
parameter tree (and, for ResNets, in `batch_stats`): `layout(spec)` lists them, with how each
is laid out on each side. Linear layers are transposed (PyTorch keeps (out, in)), the fused
qkv projection becomes (width, 3, heads, head_dim) and the attention output (heads, head_dim,
width), convolutions go from OIHW to HWIO, BatchNorm running statistics go to `batch_stats`,
and `num_batches_tracked` (plus OpenAI's integer metadata) is dropped. A state dict that misses
a tensor, has one too many or has a shape the architecture does not take is refused, naming it.

The architecture is read off the shapes (`infer_spec`): widths, depths, patch size, image
size, context length, vocabulary and embedding size; heads from an open_clip config beside the
weights, else from the run's config (never guessed). The activation is not in the weights
either: it comes from that config (`quick_gelu`), or the caller (psd_jax/pretrained.py).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import numpy as np

from psd_jax.models import PRESETS, ModelSpec

IGNORED = re.compile(r'(.*num_batches_tracked|input_resolution|context_length|vocab_size|'
                     r'(.*\.)?attn_mask)$')
HEAD_WIDTH = 64  # open_clip's default vision head width (CLIPVisionCfg.head_width)
OPEN_CLIP_TEXT_HEADS = 8  # open_clip's default text heads (CLIPTextCfg.heads)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Where one state-dict tensor goes. kind: 'same' (reshaped only), 'linear' (transposed:
    PyTorch's (out, in) <-> psd_jax's (in..., out...), `in_dims` leading psd_jax axes being the
    input) or 'conv' (OIHW <-> HWIO)."""
    collection: str  # 'params' | 'batch_stats'
    path: tuple[str, ...]
    kind: str = 'same'
    in_dims: int = 1


def _block(torch_prefix: str, path: tuple[str, ...]) -> dict[str, Rule]:
    """One residual attention block (ln_1, attn, ln_2, mlp)."""
    p = lambda *rest: path + rest  # noqa: E731
    return {
        f'{torch_prefix}ln_1.weight': Rule('params', p('ln1', 'scale')),
        f'{torch_prefix}ln_1.bias': Rule('params', p('ln1', 'bias')),
        f'{torch_prefix}ln_2.weight': Rule('params', p('ln2', 'scale')),
        f'{torch_prefix}ln_2.bias': Rule('params', p('ln2', 'bias')),
        f'{torch_prefix}attn.in_proj_weight': Rule('params', p('attn', 'qkv', 'kernel'), 'linear'),
        f'{torch_prefix}attn.in_proj_bias': Rule('params', p('attn', 'qkv', 'bias')),
        f'{torch_prefix}attn.out_proj.weight': Rule('params', p('attn', 'out', 'kernel'), 'linear',
                                                    in_dims=2),
        f'{torch_prefix}attn.out_proj.bias': Rule('params', p('attn', 'out', 'bias')),
        f'{torch_prefix}mlp.c_fc.weight': Rule('params', p('mlp', 'fc', 'kernel'), 'linear'),
        f'{torch_prefix}mlp.c_fc.bias': Rule('params', p('mlp', 'fc', 'bias')),
        f'{torch_prefix}mlp.c_proj.weight': Rule('params', p('mlp', 'proj', 'kernel'), 'linear'),
        f'{torch_prefix}mlp.c_proj.bias': Rule('params', p('mlp', 'proj', 'bias')),
    }


def _conv_bn(conv: str, bn: str, path: tuple[str, ...]) -> dict[str, Rule]:
    """A bias-free convolution and its BatchNorm (ResNet stem and bottlenecks)."""
    return {f'{conv}.weight': Rule('params', path + ('conv', 'kernel'), 'conv'),
            f'{bn}.weight': Rule('params', path + ('bn', 'scale')),
            f'{bn}.bias': Rule('params', path + ('bn', 'bias')),
            f'{bn}.running_mean': Rule('batch_stats', path + ('bn', 'mean')),
            f'{bn}.running_var': Rule('batch_stats', path + ('bn', 'var'))}


def layout(spec: ModelSpec) -> dict[str, Rule]:
    """Every tensor of the open_clip / OpenAI state dict of `spec`'s architecture, by name."""
    text = ('text_tower',)
    rules = {'logit_scale': Rule('params', ('logit_scale',)),
             'positional_embedding': Rule('params', text + ('positional_embedding',)),
             'text_projection': Rule('params', text + ('text_projection',)),
             'token_embedding.weight': Rule('params', text + ('token_embedding', 'embedding')),
             'ln_final.weight': Rule('params', text + ('ln_final', 'scale')),
             'ln_final.bias': Rule('params', text + ('ln_final', 'bias'))}
    for i in range(spec.text_depth):
        rules.update(_block(f'transformer.resblocks.{i}.', text + ('transformer', f'block{i}')))
    image, kind = ('image_tower',), spec.image['kind']
    if kind == 'vit':
        rules.update({
            'visual.class_embedding': Rule('params', image + ('class_embedding',)),
            'visual.positional_embedding': Rule('params', image + ('positional_embedding',)),
            'visual.proj': Rule('params', image + ('proj',)),
            'visual.conv1.weight': Rule('params', image + ('patch_embed', 'kernel'), 'conv'),
            'visual.ln_pre.weight': Rule('params', image + ('ln_pre', 'scale')),
            'visual.ln_pre.bias': Rule('params', image + ('ln_pre', 'bias')),
            'visual.ln_post.weight': Rule('params', image + ('ln_post', 'scale')),
            'visual.ln_post.bias': Rule('params', image + ('ln_post', 'bias'))})
        for i in range(spec.image['depth']):
            rules.update(_block(f'visual.transformer.resblocks.{i}.',
                                image + ('transformer', f'block{i}')))
        return rules
    for n in (1, 2, 3):
        rules.update(_conv_bn(f'visual.conv{n}', f'visual.bn{n}', image + (f'stem{n}',)))
    for stage, blocks in enumerate(spec.image['layers'], start=1):
        for j in range(blocks):
            torch_block, block = f'visual.layer{stage}.{j}', image + (f'layer{stage}_{j}',)
            for n in (1, 2, 3):
                rules.update(_conv_bn(f'{torch_block}.conv{n}', f'{torch_block}.bn{n}',
                                      block + (f'conv{n}',)))
            if j == 0:  # CLIP's first bottleneck of every stage changes width: a downsample
                rules.update(_conv_bn(f'{torch_block}.downsample.0',
                                      f'{torch_block}.downsample.1', block + ('downsample',)))
    pool = image + ('attnpool',)
    rules['visual.attnpool.positional_embedding'] = Rule('params',
                                                         pool + ('positional_embedding',))
    for name in ('q_proj', 'k_proj', 'v_proj', 'c_proj'):
        rules[f'visual.attnpool.{name}.weight'] = Rule(
            'params', pool + (name, 'kernel'), 'linear', in_dims=2 if name == 'c_proj' else 1)
        rules[f'visual.attnpool.{name}.bias'] = Rule('params', pool + (name, 'bias'))
    return rules


def _count(state_dict: Mapping[str, Any], pattern: str) -> int:
    found = {int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _heads(tower: str, width: int, head_width: int) -> int:
    """width / head_width, refused by name when the width does not split into such heads."""
    if width % head_width or width < head_width:
        raise ValueError(f'cannot tell the {tower} tower\'s attention heads: width {width} is '
                         f'not a multiple of {head_width}; put its open_clip_config.json (which '
                         'names them) beside the weights')
    return width // head_width


def infer_spec(state_dict: Mapping[str, Any], act: str,
               model_cfg: Mapping[str, Any] | None = None,
               heads: tuple[int | None, int | None] | None = None,
               text_pool: str = 'argmax') -> ModelSpec:
    """The architecture of a CLIP state dict, read off its tensors' shapes; the head counts
    from open_clip's `model_cfg` when given (its vision head_width, its text heads), else from
    `heads` (image, text: the run's config), else refused naming what to give (never guessed:
    ViT-H-14, g-14 and bigG-14 do not use 64-wide heads)."""
    vision_cfg, text_cfg = (model_cfg or {}).get('vision_cfg', {}), (model_cfg or {}).get(
        'text_cfg', {})
    image_heads, text_heads = heads or (None, None)
    if model_cfg is None and not (image_heads and text_heads):
        raise ValueError('the weights have no open_clip_config.json beside them and no config '
                         'gives the attention heads: put the model\'s open_clip_config.json '
                         'beside the weights, or pass the heads (model.preset names them)')
    head_width = vision_cfg.get('head_width') or HEAD_WIDTH
    shape = lambda key: tuple(np.shape(state_dict[key]))  # noqa: E731
    for key in ('token_embedding.weight', 'positional_embedding', 'text_projection'):
        if key not in state_dict:
            raise ValueError(f'not a CLIP state dict: no {key!r} (has e.g. '
                             f'{sorted(state_dict)[:5]})')
    vocab, text_width = shape('token_embedding.weight')
    text = dict(vocab_size=vocab, text_width=text_width, text_pool=text_pool,
                text_heads=(text_cfg.get('heads', OPEN_CLIP_TEXT_HEADS) if model_cfg is not None
                            else text_heads),
                context_length=shape('positional_embedding')[0],
                text_depth=_count(state_dict, r'transformer\.resblocks\.(\d+)\.'),
                embed_dim=shape('text_projection')[1], act=act)
    if 'visual.class_embedding' in state_dict:
        width, _, patch, _ = shape('visual.conv1.weight')
        grid = math.isqrt(shape('visual.positional_embedding')[0] - 1)
        image = dict(kind='vit', patch_size=patch, width=width,
                     heads=(_heads('image', width, head_width) if model_cfg is not None
                            else image_heads),
                     depth=_count(state_dict, r'visual\.transformer\.resblocks\.(\d+)\.'))
        return ModelSpec(image_size=grid * patch, image=image, **text)
    if 'visual.layer1.0.conv1.weight' in state_dict:
        width = shape('visual.layer1.0.conv1.weight')[0]
        layers = tuple(_count(state_dict, rf'visual\.layer{s}\.(\d+)\.') for s in (1, 2, 3, 4))
        grid = math.isqrt(shape('visual.attnpool.positional_embedding')[0] - 1)
        image = dict(kind='resnet', layers=layers, width=width,
                     heads=(width * 32 // head_width if model_cfg is not None else image_heads))
        return ModelSpec(image_size=grid * 32, image=image, **text)
    raise ValueError('not a CLIP state dict: its image tower is neither a ViT '
                     "('visual.class_embedding') nor a ModifiedResNet ('visual.layer1.0...')")


def preset_name(spec: ModelSpec) -> str | None:
    """The preset with exactly this architecture (activation aside), if any."""
    for name, preset in PRESETS.items():
        if dataclasses.replace(preset, act=spec.act) == spec:
            return name
    return None


def _to_psd(rule: Rule, x: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
    if rule.kind == 'conv':
        x = x.transpose(2, 3, 1, 0)
    elif rule.kind == 'linear':
        x = x.T
    if x.size != math.prod(target):
        raise ValueError(f'shape {x.shape} cannot become {target}')
    return x.reshape(target)


def _to_torch(rule: Rule, x: np.ndarray) -> np.ndarray:
    if rule.kind == 'conv':
        return x.transpose(3, 2, 0, 1)
    if rule.kind == 'linear':
        fan_in = math.prod(x.shape[:rule.in_dims])
        return x.reshape(fan_in, -1).T
    if x.ndim > 1 and rule.path[-1] == 'bias':  # fused biases are flat in PyTorch
        return x.reshape(-1)
    return x


def _nested_get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def _nested_set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


def import_state_dict(state_dict: Mapping[str, Any], spec: ModelSpec,
                      shapes: Mapping[str, Any]) -> dict[str, dict]:
    """{'params': ..., 'batch_stats': ...} (float32 numpy) from an open_clip / OpenAI state dict.
    `shapes`: the model's variables (e.g. `jax.eval_shape` of its init), whose shapes every
    converted tensor must match. Raises ValueError naming missing, extra or misshapen
    tensors."""
    rules = layout(spec)
    present = {k for k in state_dict if not IGNORED.match(k)}
    missing, extra = sorted(set(rules) - present), sorted(present - set(rules))
    if missing or extra:
        raise ValueError(f'the state dict does not match the architecture {spec}: missing '
                         f'{missing[:8]}{" ..." if len(missing) > 8 else ""} '
                         f'({len(missing)}), unexpected {extra[:8]}'
                         f'{" ..." if len(extra) > 8 else ""} ({len(extra)})')
    out: dict[str, dict] = {'params': {}, 'batch_stats': {}}
    for key, rule in rules.items():
        target = tuple(np.shape(_nested_get(shapes[rule.collection], rule.path)))
        x = np.asarray(state_dict[key], np.float32)
        try:
            _nested_set(out[rule.collection], rule.path, _to_psd(rule, x, target))
        except ValueError as e:
            raise ValueError(f'state dict tensor {key!r}: {e} ({"/".join(rule.path)})') from e
    return out


def export_state_dict(variables: Mapping[str, Any], spec: ModelSpec) -> dict[str, np.ndarray]:
    """The open_clip state dict (float32 numpy, PyTorch layouts) of psd_jax `variables`
    ({'params', optional 'batch_stats'}); `import_state_dict` inverts it exactly."""
    out = {}
    for key, rule in layout(spec).items():
        x = np.asarray(_nested_get(variables[rule.collection], rule.path), np.float32)
        out[key] = np.array(_to_torch(rule, x), order="C")  # 0-d stays 0-d
    return out


def open_clip_config(spec: ModelSpec) -> dict:
    """open_clip's model config (its `model_cfg`) for `spec`'s architecture."""
    image = spec.image
    if image['kind'] == 'vit':
        vision = {'image_size': spec.image_size, 'layers': image['depth'],
                  'width': image['width'], 'patch_size': image['patch_size'],
                  'head_width': image['width'] // image['heads']}
    else:
        vision = {'image_size': spec.image_size, 'layers': list(image['layers']),
                  'width': image['width'], 'patch_size': None}
    if spec.text_pool != 'argmax':
        raise ValueError(f'text pooling {spec.text_pool!r} has no open_clip equivalent (its '
                         "'last' reads the last position, not the last token); open_clip models "
                         "pool with 'argmax'")
    if spec.act not in ('quick_gelu', 'gelu'):
        raise ValueError(f'activation {spec.act!r} has no open_clip equivalent; open_clip '
                         "models use 'quick_gelu' or exact 'gelu'")
    return {'embed_dim': spec.embed_dim, 'quick_gelu': spec.act == 'quick_gelu',
            'vision_cfg': vision,
            'text_cfg': {'context_length': spec.context_length, 'vocab_size': spec.vocab_size,
                         'width': spec.text_width, 'heads': spec.text_heads,
                         'layers': spec.text_depth}}
