"""Recipes that make the files shipped in ``adlib/weights``: backbone pretraining, the tiny CLIP, the students'
teachers and the chapters' converged checkpoints. Each runs from the one command, ``python -m adlib pretrain |
train-clip | distill-teacher | train-checkpoint``."""
