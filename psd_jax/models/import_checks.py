"""What an imported checkpoint must say before psd_jax builds a model for it: refuse, never guess.

psd_jax implements OpenAI CLIP's architectures. An open_clip model config (`model_cfg` of an
`open_clip_config.json`) can describe other forwards: other pooling, no causal mask, layer
scale, attentional pooling, timm or Hugging Face towers. `check_model_cfg` accepts a config only
when every field that changes the forward has the value psd_jax computes (or one it can honour:
quick_gelu or exact GELU), and refuses any other
naming the field. `check_layout` names state-dict layouts that are not open_clip's CLIP layout
(Hugging Face transformers, timm image towers, CustomTextCLIP), and `clean_keys` strips the
prefixes and buffers that carry no weights (`module.`, torch.compile's `_orig_mod.`,
TorchScript's `attn_mask`).
"""

from __future__ import annotations

from typing import Any, Mapping

# field -> the value psd_jax's forward computes (None: absent or null); any other is refused
FORWARD_DEFAULTS = {
    'vision_cfg': {
        'pool_type': 'tok', 'attentional_pool': False, 'no_ln_pre': False,
        'final_ln_after_pool': False, 'pos_embed_type': 'learnable', 'ls_init_value': None,
        'act_kwargs': None, 'norm_kwargs': None, 'mlp_ratio': 4.0, 'timm_model_name': None,
        'block_type': None, 'qk_norm': False, 'scaled_cosine_attn': False,
        'scale_heads': False, 'scale_attn_inner': False, 'scale_attn': False,
        'scale_fc': False, 'global_average_pool': False, 'input_patchnorm': False,
        'embed_cls': False, 'proj_type': 'linear', 'proj_bias': False,
    },
    'text_cfg': {
        'no_causal_mask': False, 'final_ln_after_pool': False, 'proj_bias': False,
        'proj_type': 'linear', 'embed_cls': False, 'ls_init_value': None, 'act_kwargs': None,
        'norm_kwargs': None, 'mlp_ratio': 4.0, 'hf_model_name': None, 'block_type': None,
        'qk_norm': False, 'scaled_cosine_attn': False, 'scale_heads': False,
        'scale_attn_inner': False, 'scale_attn': False, 'scale_fc': False,
    },
    '': {'custom_text': False, 'init_logit_bias': None, 'nonscalar_logit_scale': False},
}
TEXT_POOLS = ('argmax',)  # open_clip's 'last' reads the last position, psd_jax's 'last' the
# last token before the padding: not the same forward
# fields that do not change the forward of the model psd_jax builds (sizes are read off the
# tensors and compared; the rest only matter with a refused setting, or in training)
INERT = {
    'vision_cfg': {'layers', 'width', 'head_width', 'patch_size', 'image_size', 'patch_dropout',
                   'output_tokens', 'attn_pooler_queries', 'attn_pooler_heads',
                   'timm_model_pretrained', 'timm_pool', 'timm_proj', 'timm_proj_bias',
                   'timm_drop', 'timm_drop_path'},
    'text_cfg': {'context_length', 'vocab_size', 'width', 'heads', 'layers', 'pad_id', 'eos_id',
                 'output_tokens', 'hf_tokenizer_name', 'tokenizer_mode', 'tokenizer_kwargs',
                 'hf_model_pretrained', 'hf_proj_type', 'hf_pooler_type', 'pool_type'},
    '': {'embed_dim', 'quick_gelu', 'vision_cfg', 'text_cfg', 'cast_dtype', 'output_dict',
         'init_logit_scale'},
}


def check_model_cfg(cfg: Mapping[str, Any], where: str) -> str:
    """Refuse an open_clip model config whose forward psd_jax does not compute, naming the
    field; returns the text pooling it asks for (open_clip's 'argmax')."""
    for section, defaults in FORWARD_DEFAULTS.items():
        fields = cfg if not section else (cfg.get(section) or {})
        prefix = f'{section}.' if section else ''
        for name, value in fields.items():
            if name in INERT[section]:
                continue
            if name not in defaults:
                raise ValueError(f'{where}: {prefix}{name}={value!r} is a field psd_jax does not '
                                 'know; it may change the forward, so the model is not imported')
            if name == 'block_type' and value == 'default':
                continue
            if value != defaults[name] and not (value is None and defaults[name] is False):
                raise ValueError(f'{where}: {prefix}{name}={value!r} changes the forward, and '
                                 f'psd_jax computes only {prefix}{name}={defaults[name]!r} '
                                 '(OpenAI CLIP\'s architecture)')
    pool = (cfg.get('text_cfg') or {}).get('pool_type', 'argmax')
    if pool not in TEXT_POOLS:
        raise ValueError(f'{where}: text_cfg.pool_type={pool!r} is not computed by psd_jax '
                         f'(allowed: {list(TEXT_POOLS)})')
    return pool


def clean_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict without wrapper prefixes (`module.` of DDP, `_orig_mod.` of
    torch.compile) and without TorchScript's `attn_mask` buffers (a constant causal mask,
    not a weight)."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ('module.', '_orig_mod.'):
            while key.startswith(prefix):
                key = key[len(prefix):]
        key = key.replace('._orig_mod.', '.')
        if key == 'attn_mask' or key.endswith('.attn_mask'):
            continue
        out[key] = value
    return out


def check_layout(state_dict: Mapping[str, Any], where: str) -> None:
    """Name the layouts psd_jax does not import, instead of listing missing tensors."""
    keys = list(state_dict)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has('vision_model.') or has('text_model.'):
        raise ValueError(f'{where}: a Hugging Face transformers CLIP checkpoint (vision_model.*, '
                         'text_model.*) is not supported; use the open_clip folder of the same '
                         'model (open_clip_config.json + open_clip_model.safetensors)')
    if has('visual.trunk.'):
        raise ValueError(f'{where}: an open_clip model with a timm image tower (visual.trunk.*) '
                         'is not supported; psd_jax imports OpenAI CLIP ViTs and ModifiedResNets')
    if has('text.') and not has('token_embedding.'):
        raise ValueError(f'{where}: an open_clip CustomTextCLIP layout (text.*: a separate text '
                         'tower, as in SigLIP, CoCa or Hugging Face text models) is not '
                         'supported; psd_jax imports the CLIP layout (token_embedding, '
                         'transformer.resblocks.*)')
