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
