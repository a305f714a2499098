"""The run: the train loop, the compiled step and what it is made of (batch, schedules,
accumulation, the divergence guard), and what a run reports (metrics, FLOPs, MFU)."""
