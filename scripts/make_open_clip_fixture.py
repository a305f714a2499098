"""Writes tests/fixtures/open_clip: small random open_clip models and their outputs, the golden
reference psd_jax's weight import is tested against (tests/test_pretrained.py), without torch.

    scripts/make_open_clip_env.sh        # torch + open_clip in their own venv
    ~/.cache/psd_jax/open_clip_venv/bin/python scripts/make_open_clip_fixture.py

Two models, every tensor perturbed (so a bias or a normalisation statistic mapped to the wrong
place shows), weights rounded to float16 to keep the files small (the outputs are computed from
the rounded weights, in float32): `vit`, a narrow quick-GELU ViT with the architecture of
psd_jax's 'tiny' preset (CLIP's vocabulary), and `rn`, a narrow exact-GELU ModifiedResNet with
its BatchNorm statistics. Each folder is an open_clip `local-dir:` folder (config +
safetensors); `outputs.npz` holds fixed uint8 images and token ids, and each model's image and
text features and logit scale in eval mode. `tokens.json` holds open_clip's tokenisation of
captions that need its text fixing and special tokens.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import open_clip
import torch
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parents[1] / 'tests' / 'fixtures' / 'open_clip'
MODELS = {
    'vit': {'embed_dim': 32, 'quick_gelu': True,
            'vision_cfg': {'image_size': 32, 'layers': 2, 'width': 32, 'patch_size': 8,
                           'head_width': 16},
            'text_cfg': {'context_length': 16, 'vocab_size': 49408, 'width': 32, 'heads': 2,
                         'layers': 2}},
    'rn': {'embed_dim': 32, 'quick_gelu': False,
           'vision_cfg': {'image_size': 64, 'layers': [1, 1, 1, 1], 'width': 8,
                          'patch_size': None},
           'text_cfg': {'context_length': 16, 'vocab_size': 1000, 'width': 64, 'heads': 1,
                        'layers': 1}},
}
CAPTIONS = [
    'a photo of a cat', 'A Photo Of A CAT!', '\u201ccurly quotes\u201d and \u2018single\u2019 ones',
    '\ufb01ne \ufb02our', '\uff26\uff55\uff4c\uff4c\uff0d\uff57\uff49\uff44\uff54\uff48 text',
    'caf\u00c3\u00a9 au lait', 'fish &amp;amp; chips', '  many   spaces\tand\nlines  ',
    'emoji \U0001f600 inside', 'numbers 12345 and 3.14', "it's the dog's bone, isn't it",
    'a caption <end_of_text> in the middle', '<start_of_text> at the start',
    'the old <|endoftext|> spelling', 'ümlaut and accents: naïve résumé', '日本語のキャプション',
    'a very long caption ' * 8, 'UPPER lower MiXeD', 'hyphen-ated and under_scored words',
    'html &lt;b&gt;bold&lt;/b&gt;']


def perturbed(model: torch.nn.Module, gen: torch.Generator) -> torch.nn.Module:
    """Every parameter and buffer moved off its initial value, then rounded to float16."""
    with torch.no_grad():
        for name, tensor in list(model.state_dict().items()):
            if not tensor.is_floating_point():
                continue
            noise = 0.05 * torch.randn(tensor.shape, generator=gen)
            if name.endswith('running_var'):
                tensor.copy_((1.0 + noise).abs() + 0.1)
            else:
                tensor.add_(noise)
            tensor.copy_(tensor.half().float())
    return model


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    outputs = {}
    for name, cfg in MODELS.items():
        model = perturbed(open_clip.CLIP(**cfg), gen).eval()
        folder = OUT / name
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.half().contiguous() for k, v in model.state_dict().items()
                   if v.is_floating_point()}, str(folder / 'open_clip_model.safetensors'))
        (folder / 'open_clip_config.json').write_text(json.dumps({'model_cfg': cfg}, indent=1))
        size = cfg['vision_cfg']['image_size']
        context, vocab = cfg['text_cfg']['context_length'], cfg['text_cfg']['vocab_size']
        images = rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8)
        texts = np.zeros((4, context), np.int64)
        for i, length in enumerate((3, 7, context - 1, context)):
            texts[i, :length] = rng.integers(1, vocab - 1, length)
            texts[i, length - 1] = vocab - 1  # the end token: the highest id, pooled there
        mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(
            open_clip.OPENAI_DATASET_STD)
        pixels = (torch.from_numpy(images).float() / 255 - mean) / std
        with torch.no_grad():
            image_features = model.encode_image(pixels.permute(0, 3, 1, 2))
            text_features = model.encode_text(torch.from_numpy(texts))
        outputs.update({f'{name}_images': images, f'{name}_texts': texts.astype(np.int32),
                        f'{name}_image_features': image_features.numpy(),
                        f'{name}_text_features': text_features.numpy(),
                        f'{name}_logit_scale': model.logit_scale.detach().numpy()})
    np.savez_compressed(OUT / 'outputs.npz', **outputs)
    tokenizer = open_clip.get_tokenizer('ViT-B-32')
    tokens = tokenizer(CAPTIONS, context_length=77).numpy().tolist()
    (OUT / 'tokens.json').write_text(json.dumps(
        {'open_clip': open_clip.__version__, 'captions': CAPTIONS, 'tokens': tokens}))
    print(f'wrote {OUT}: ' + ', '.join(sorted(p.name for p in OUT.rglob('*') if p.is_file())))


if __name__ == '__main__':
    main()
