"""PSD, CLIP's modified ResNet-50 on YFCC15M (15M pairs), 32 epochs at batch 8192.

Sized for a TPU v4-128 slice (64 chips) or 4 nodes of 8 x A100-80GB; BatchNorm statistics are
computed over the global batch. Prepare the YFCC15M subset with img2dataset into
/data/yfcc15m/{train,val}, then

    python -m psd_jax.main --config configs/psd_yfcc15m_rn50.py --workdir gs://bucket/psd_yfcc \\
        --config.data.path=/data/yfcc15m

Not yet run by the project: its numbers go to docs/results when they exist.
"""

from psd_jax.config import paper_base


def get_config():
    return paper_base('RN50', 'yfcc15m', '/data/yfcc15m', global_batch=8192, epochs=32,
                      train_pairs=15_000_000, lr=1e-3, warmup_steps=5000)
