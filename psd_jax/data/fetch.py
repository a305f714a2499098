"""Download the project's real data into a cache directory, once.

    python -m psd_jax.data.fetch emoji openmoji clip_vocab   # into $PSD_JAX_CACHE

- `emoji`: emoji artwork (64 px PNGs, Google and Twitter styles) and English names/keywords,
  from the npm registry with `npm pack` (emoji-datasource-google / -twitter, Apache-2.0 code,
  artwork under Apache-2.0 (Noto) and CC-BY-4.0 (Twemoji); emojibase-data, MIT).
- `openmoji`: OpenMoji's colour artwork (SVG, CC BY-SA 4.0) and its data table, `npm pack
  openmoji`; with the emoji above it makes the `emoji_styles` dataset (one name, several
  artists).
- `clip_vocab`: CLIP's BPE vocabulary, extracted from the open-clip-torch wheel on PyPI.
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

EMOJI_PACKAGES = {  # pinned, so the dataset is the same everywhere
    'emoji-datasource-google': '16.0.0',
    'emoji-datasource-twitter': '16.0.0',
    'emojibase-data': '17.0.0',
}
OPENMOJI_PACKAGES = {'openmoji': '17.0.0'}  # colour SVGs, CC BY-SA 4.0
CLIP_VOCAB_NAME = 'bpe_simple_vocab_16e6.txt.gz'


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


def clip_vocab(root: pathlib.Path | None = None) -> pathlib.Path:
    """Path of CLIP's BPE vocabulary, extracted (once) from the open-clip-torch wheel."""
    root = root or cache_dir()
    path = root / CLIP_VOCAB_NAME
    if path.exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        print('fetching the open-clip-torch wheel for its BPE vocabulary ...', file=sys.stderr)
        result = subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps',
                                 '--only-binary', ':all:', '-q', '-d', tmp, 'open-clip-torch'],
                                capture_output=True, text=True)
        wheels = list(pathlib.Path(tmp).glob('open_clip_torch-*.whl'))
        if result.returncode or not wheels:
            raise RuntimeError('could not download the open-clip-torch wheel (`pip download '
                               f'--no-deps open-clip-torch`):\n{result.stderr}')
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(f'open_clip/{CLIP_VOCAB_NAME}')
        partial = path.with_suffix('.partial')
        partial.write_bytes(data)
        partial.replace(path)
    return path


FETCHERS = {'emoji': emoji_sources, 'openmoji': openmoji_sources,
            'clip_vocab': clip_vocab}


def main(argv: list[str]) -> None:
    names = argv or list(FETCHERS)
    unknown = [n for n in names if n not in FETCHERS]
    if unknown:
        raise SystemExit(f'unknown data {unknown}; allowed: {sorted(FETCHERS)}')
    for name in names:
        print(f'{name}: {FETCHERS[name]()}')


if __name__ == '__main__':
    main(sys.argv[1:])
