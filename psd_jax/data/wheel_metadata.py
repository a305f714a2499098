"""Read the field's zero-shot class names and templates out of the files two PyPI wheels ship.

open-clip-torch's `open_clip/zero_shot_metadata.py` holds OpenAI's curated ImageNet class names
and its 80 prompt templates (as lambdas); clip-benchmark's `en_classnames.json` and
`en_zeroshot_classification_templates.json` hold CLIP_benchmark's names and templates per
dataset, and its `datasets/builder.py` the WordNet ids of the 200 ImageNet-A and ImageNet-R
classes. The Python files are parsed (`ast`), never imported or executed: a template lambda
`lambda c: f'a photo of a {c}.'` becomes the format string 'a photo of a {}.'.

`extract(files)` -> {'classnames': {key: [...]}, 'templates': {key: [...]},
'imagenet_subsets': {'imagenet_a': [wnid, ...], 'imagenet_r': [...]}}; the keys are
CLIP_benchmark's ('imagenet1k', 'cifar100', 'pets', ...).
"""

from __future__ import annotations

import ast
import json
from typing import Mapping

WANTED = {
    'open-clip-torch': ('open_clip/zero_shot_metadata.py',),
    'clip-benchmark': ('clip_benchmark/datasets/en_classnames.json',
                       'clip_benchmark/datasets/en_zeroshot_classification_templates.json',
                       'clip_benchmark/datasets/builder.py'),
}


def _template(node: ast.AST) -> str:
    """`lambda c: f'...{c}...'` -> '...{}...' (the class name's slot as a format field)."""
    if not (isinstance(node, ast.Lambda) and isinstance(node.body, ast.JoinedStr)):
        raise ValueError(f'not a template lambda: {ast.unparse(node)}')
    parts = []
    for value in node.body.values:
        if isinstance(value, ast.Constant):
            parts.append(str(value.value).replace('{', '{{').replace('}', '}}'))
        elif isinstance(value, ast.FormattedValue) and isinstance(value.value, ast.Name):
            parts.append('{}')
        else:
            raise ValueError(f'unexpected template part: {ast.unparse(value)}')
    return ''.join(parts)


def _assignments(source: str) -> dict[str, ast.AST]:
    """Every `NAME = value` in a module (at any depth), by name (the last one wins)."""
    found = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(
                node.targets[0], ast.Name):
            found[node.targets[0].id] = node.value
    return found


def open_clip_metadata(source: str) -> dict:
    """open_clip's zero_shot_metadata.py -> its ImageNet names and both template sets."""
    values = _assignments(source)
    names = ast.literal_eval(values['IMAGENET_CLASSNAMES'])
    openai = [_template(t) for t in values['OPENAI_IMAGENET_TEMPLATES'].elts]
    simple = [_template(t) for t in values['SIMPLE_IMAGENET_TEMPLATES'].elts]
    if len(names) != 1000:
        raise ValueError(f'open_clip lists {len(names)} ImageNet class names, not 1,000')
    return {'classnames': list(names), 'openai_templates': openai, 'simple_templates': simple}


def imagenet_subsets(builder_source: str) -> dict[str, list[str]]:
    """The WordNet ids of ImageNet-A's and ImageNet-R's 200 classes (CLIP_benchmark's
    builder.py names them imagenet_a_wnids / imagenet_r_wnids)."""
    values = _assignments(builder_source)
    out = {}
    for subset in ('imagenet_a', 'imagenet_r'):
        wnids = ast.literal_eval(values[f'{subset}_wnids'])
        out[subset] = sorted(wnids)
        if len(out[subset]) != 200:
            raise ValueError(f'{subset}: {len(out[subset])} classes, expected 200')
    return out


def extract(files: Mapping[str, str]) -> dict:
    """The metadata JSON's content from the wheels' files (name -> text)."""
    oc = open_clip_metadata(files['open_clip/zero_shot_metadata.py'])
    classnames = json.loads(files['clip_benchmark/datasets/en_classnames.json'])
    templates = json.loads(
        files['clip_benchmark/datasets/en_zeroshot_classification_templates.json'])
    for key, group in templates.items():  # CLIP_benchmark writes the slot as {c}
        if not all('{c}' in t for t in group):
            raise ValueError(f'CLIP_benchmark template of {key!r} without a {{c}} slot')
        templates[key] = [t.replace('{c}', '{}') for t in group]
    return {
        'classnames': classnames,
        'templates': templates,
        'open_clip': oc,
        'imagenet_subsets': imagenet_subsets(files['clip_benchmark/datasets/builder.py']),
    }
