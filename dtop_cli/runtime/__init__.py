"""Training runs on mmengine: configs, hooks, checkpoints, the run itself and launching.

``config``      preset + options -> the complete mmengine config (also what `dtop config` writes)
``hooks``       the mmengine hooks and wrappers dtop registers (atomic checkpoints, CPU DDP)
``checkpoints`` finding, reading and describing the checkpoints of a run
``weights``     the pretrained-weights cache
``train``       one training phase end to end
``launch``      several processes through torch's own launcher
"""
