"""PSD, ViT-B/32 on CC3M: the CLIP baseline's settings (clip_cc3m_vitb32.py) with PSD on.

Sized for a TPU v4-32 slice (16 chips) or 8 x A100-80GB, like the baseline, so the two compare
at equal compute, up to the EMA teacher's forward of half of each batch (about a sixth more
compute per step).

    python -m psd_jax.main --config configs/psd_cc3m_vitb32.py --workdir gs://bucket/psd_cc3m \\
        --config.data.path=/data/cc3m

Not yet run by the project: its numbers go to docs/results when they exist.
"""

from psd_jax.config import paper_base


def get_config():
    return paper_base('ViT-B/32', 'cc3m', '/data/cc3m', global_batch=4096, epochs=30,
                      train_pairs=2_900_000, lr=1e-3, warmup_steps=2000)
