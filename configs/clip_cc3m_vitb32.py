"""CLIP baseline, ViT-B/32 on CC3M (about 2.9M downloadable pairs), 30 epochs at batch 4096.

Sized for a TPU v4-32 slice (16 chips, 32 GiB HBM each; 256 pairs per chip) or 8 x A100-80GB.
Prepare CC3M with img2dataset (`--output_format webdataset`) into /data/cc3m/{train,val}, then

    python -m psd_jax.main --config configs/clip_cc3m_vitb32.py --workdir gs://bucket/clip_cc3m \\
        --config.data.path=/data/cc3m

Not yet run by the project: its numbers go to docs/results when they exist.
"""

from psd_jax.config import paper_base


def get_config():
    config = paper_base('ViT-B/32', 'cc3m', '/data/cc3m', global_batch=4096, epochs=30,
                        train_pairs=2_900_000, lr=1e-3, warmup_steps=2000)
    config.loss.kind = 'clip'
    return config
