"""PSD, ViT-B/16 on CC12M (about 10M downloadable pairs), 32 epochs at batch 8192.

Sized for a TPU v4-128 slice (64 chips; 128 pairs per chip, bfloat16, FSDP) or 4 nodes of
8 x H100. Prepare CC12M with img2dataset into /data/cc12m/{train,val}, then

    python -m psd_jax.main --config configs/psd_cc12m_vitb16.py --workdir gs://bucket/psd_cc12m \\
        --config.data.path=/data/cc12m

Not yet run by the project: its numbers go to docs/results when they exist.
"""

from psd_jax.config import paper_base


def get_config():
    return paper_base('ViT-B/16', 'cc12m', '/data/cc12m', global_batch=8192, epochs=32,
                      train_pairs=10_000_000, lr=1e-3, warmup_steps=5000)
