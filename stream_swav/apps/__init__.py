"""Applications built on the library: the `stream-swav` subcommands besides train.

The defaults below are shared by the command line and the apps' functions. They live here,
in a module that imports nothing, so that building the parser (`stream-swav --help`) never
pays for torch.
"""

# Weighted kNN as in DINO: the k most cosine-similar index features vote with exp(similarity / T).
KNN_K = 20
KNN_TEMPERATURE = 0.07
# `stream-swav follow`: its metrics port (the trainer's is metrics.port, 9400) and poll interval.
FOLLOW_PORT = 9401
FOLLOW_INTERVAL_S = 60.0
# `make-shards --reencode` formats and the extension each is stored under.
REENCODE_EXT = {"jpeg": "jpg", "png": "png"}
# `stream-swav demo --dataset`.
DEMO_DATASETS = ("auto", "fashion-mnist", "procedural")
# The demo trains this many images, stopping earlier when the time cap is reached (the rate
# stays constant, so a cut-off loses images, not a schedule's end). On the 2-core development machine
# (December 2026) the learner trains the demo's ResNet-10 at ~720 images/s: 192,000 images in about
# 4.5 minutes. On a slower machine the cap stops training earlier (fewer images, lower scores), but
# it bounds only the training: on one 2.5x slower the whole command would take ~13 minutes (README,
# Results: an estimate).
DEMO_IMAGES = 192_000  # 1,500 steps of 128
DEMO_MINUTES = 6.0
DEMO_GPU_IMAGES = 4_000_000
DEMO_GPU_MINUTES = 8.0
