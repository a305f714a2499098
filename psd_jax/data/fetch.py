"""Download the project's real data into a cache directory, once.

    python -m psd_jax.data.fetch emoji openmoji clip_vocab   # into $PSD_JAX_CACHE

- `emoji`: emoji artwork (64 px PNGs, Google and Twitter styles) and English names/keywords,
  from the npm registry with `npm pack` (emoji-datasource-google / -twitter, Apache-2.0 code,
  artwork under Apache-2.0 (Noto) and CC-BY-4.0 (Twemoji); emojibase-data, MIT).
- `openmoji`: OpenMoji's colour artwork (SVG, CC BY-SA 4.0) and its data table, `npm pack
  openmoji`; with the emoji above it makes the `emoji_styles` dataset (one name, several
  artists).
- `clip_vocab`: CLIP's BPE vocabulary, extracted from the open-clip-torch wheel on PyPI.
- `zero_shot_metadata`: the class names and prompt templates the field's zero-shot numbers are
  computed with: OpenAI's curated ImageNet names and 80 templates (open-clip-torch's
  `open_clip/zero_shot_metadata.py`) and CLIP_benchmark's per-dataset names and templates
  (`clip_benchmark/datasets/en_*.json`, with its ImageNet-A / -R class subsets), read from the
  two wheels on PyPI (pinned) into one JSON file. Nothing of them is kept in this repository.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Callable

EMOJI_PACKAGES = {  # pinned, so the dataset is the same everywhere
    'emoji-datasource-google': '16.0.0',
    'emoji-datasource-twitter': '16.0.0',
    'emojibase-data': '17.0.0',
}
OPENMOJI_PACKAGES = {'openmoji': '17.0.0'}  # colour SVGs, CC BY-SA 4.0
CLIP_VOCAB_NAME = 'bpe_simple_vocab_16e6.txt.gz'
METADATA_NAME = 'zero_shot_metadata.json'
METADATA_WHEELS = {'open-clip-torch': '3.3.0', 'clip-benchmark': '1.6.2'}  # pinned: same prompts


def cache_dir() -> pathlib.Path:
    """$PSD_JAX_CACHE, else ~/.cache/psd_jax (outside any repository)."""
    return pathlib.Path(os.environ.get('PSD_JAX_CACHE',
                                       pathlib.Path.home() / '.cache' / 'psd_jax'))


def _safe_extract(archive: tarfile.TarFile, dest: pathlib.Path, wanted) -> None:
    members = [m for m in archive.getmembers() if m.isfile() and wanted(m.name)]
    for m in members:
        target = (dest / m.name).resolve()
        if not str(target).startswith(str(dest.resolve())):
            raise ValueError(f'refusing to extract {m.name} outside {dest}')
    archive.extractall(dest, members=members, filter='data')


def _npm_unpack(root: pathlib.Path, packages: dict[str, str], wanted) -> pathlib.Path:
    """`npm pack` each package@version and unpack the files `wanted(package, name)` selects
    into root/<package>/; once (root/.complete marks a finished fetch). Returns root."""
    done = root / '.complete'
    if done.exists():
        return root
    npm = shutil.which('npm')
    if npm is None:
        specs = ' '.join(f'{p}@{v}' for p, v in packages.items())
        raise RuntimeError(
            f'npm was not found, and this dataset is fetched with it. Install Node.js and '
            f'npm (Debian: `apt-get install npm`), or run `npm pack {specs}` in {root} '
            f'yourself, then try again.')
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        for package, version in packages.items():
            tgz = pathlib.Path(tmp) / f'{package}-{version}.tgz'
            print(f'fetching {package}@{version} with npm pack ...', file=sys.stderr)
            result = subprocess.run([npm, 'pack', f'{package}@{version}', '--silent',
                                     '--pack-destination', tmp], capture_output=True, text=True)
            if result.returncode or not tgz.exists():
                raise RuntimeError(f'`npm pack {package}@{version}` failed:\n{result.stderr}')
            with tarfile.open(tgz) as archive:
                _safe_extract(archive, root / package,
                              lambda name, package=package: wanted(package, name))
    done.write_text('ok\n')
    return root


def _emoji_wanted(package: str, name: str) -> bool:
    if package == 'emojibase-data':
        return name in ('package/en/data.json', 'package/meta/groups.json', 'package/LICENSE')
    style = package.rsplit('-', 1)[-1]
    return (name in ('package/emoji.json', 'package/LICENSE')
            or name.startswith(f'package/img/{style}/64/'))


def emoji_sources(root: pathlib.Path | None = None) -> pathlib.Path:
    """Fetch (once) and unpack the emoji packages; returns the directory holding one folder per
    package (each with package/...)."""
    return _npm_unpack((root or cache_dir()) / 'emoji_sources', EMOJI_PACKAGES, _emoji_wanted)


def openmoji_sources(root: pathlib.Path | None = None) -> pathlib.Path:
    """Fetch (once) OpenMoji's colour SVGs, its data table and licence; returns the directory
    holding openmoji/package/{color/svg, data/openmoji.csv, LICENSE.txt}."""
    def wanted(package, name):
        return (name in ('package/data/openmoji.csv', 'package/LICENSE.txt')
                or name.startswith('package/color/svg/'))
    return _npm_unpack((root or cache_dir()) / 'openmoji_sources', OPENMOJI_PACKAGES, wanted)


def _download_wheel(package: str, version: str | None, into: str) -> pathlib.Path:
    """`pip download` one wheel (no dependencies) into `into`; returns its path."""
    spec = f'{package}=={version}' if version else package
    print(f'fetching the {spec} wheel ...', file=sys.stderr)
    result = subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps',
                             '--only-binary', ':all:', '-q', '-d', into, spec],
                            capture_output=True, text=True)
    wheels = list(pathlib.Path(into).glob(f'{package.replace("-", "_")}-*.whl'))
    if result.returncode or not wheels:
        raise RuntimeError(f'could not download the {spec} wheel (`pip download --no-deps '
                           f'{spec}`):\n{result.stderr}')
    return wheels[0]


def _once(path: pathlib.Path, make: Callable[[str], bytes]) -> pathlib.Path:
    """`path`, made once: `make(tmp)` (tmp: a scratch folder beside it) gives its bytes, which
    are written atomically, so an interrupted fetch leaves no partial file behind."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        partial = path.with_suffix('.partial')
        partial.write_bytes(make(tmp))
        partial.replace(path)
    return path


def clip_vocab(root: pathlib.Path | None = None) -> pathlib.Path:
    """Path of CLIP's BPE vocabulary, extracted (once) from the open-clip-torch wheel."""
    def make(tmp: str) -> bytes:
        with zipfile.ZipFile(_download_wheel('open-clip-torch', None, tmp)) as wheel:
            return wheel.read(f'open_clip/{CLIP_VOCAB_NAME}')
    return _once((root or cache_dir()) / CLIP_VOCAB_NAME, make)


def zero_shot_metadata(root: pathlib.Path | None = None) -> pathlib.Path:
    """Path of the zero-shot class names and templates (JSON), extracted (once) from the
    open-clip-torch and clip-benchmark wheels (psd_jax/data/wheel_metadata.py reads them); the
    wheels' files themselves are kept beside it, in zero_shot_sources/."""
    import json

    from psd_jax.data import wheel_metadata

    root = root or cache_dir()

    def make(tmp: str) -> bytes:
        files = {}
        for package, version in METADATA_WHEELS.items():
            with zipfile.ZipFile(_download_wheel(package, version, tmp)) as wheel:
                for name in wheel_metadata.WANTED[package]:
                    files[name] = wheel.read(name).decode('utf-8')
        for name, text in files.items():  # the wheels' own files, kept for parity tests
            target = root / 'zero_shot_sources' / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding='utf-8')
        metadata = {**wheel_metadata.extract(files), 'source': dict(METADATA_WHEELS)}
        return json.dumps(metadata, indent=1).encode()
    return _once(root / METADATA_NAME, make)


FETCHERS = {'emoji': emoji_sources, 'openmoji': openmoji_sources,
            'clip_vocab': clip_vocab, 'zero_shot_metadata': zero_shot_metadata}


def main(argv: list[str]) -> None:
    names = argv or list(FETCHERS)
    unknown = [n for n in names if n not in FETCHERS]
    if unknown:
        raise SystemExit(f'unknown data {unknown}; allowed: {sorted(FETCHERS)}')
    for name in names:
        print(f'{name}: {FETCHERS[name]()}')


if __name__ == '__main__':
    main(sys.argv[1:])
