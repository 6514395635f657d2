"""Serving one model replica across GPUs and nodes: tensor and expert parallelism on torch.distributed.

``layout`` (torch-free) validates ``--tp`` / ``--ep``; ``dist`` builds the process groups from torchrun's
environment; ``shard`` cuts the model and tells the loader which slice of each tensor a rank reads;
``lockstep`` keeps every rank stepping with the leader. See docs/parallel.md.
"""
