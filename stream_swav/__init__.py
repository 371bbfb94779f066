"""stream-swav: self-supervised visual features (SwAV) from an endless stream of images, on Ray.

``stream_swav.load_backbone("backbone.pt")`` turns a checkpoint's (or `stream-swav export`'s)
backbone file into the trained feature extractor; see `stream_swav.model.load_backbone`.
"""


def __getattr__(name: str):
    # Imported on first use: the command line imports this package and stays fast without torch.
    if name == "load_backbone":
        from stream_swav.model import load_backbone

        return load_backbone
    raise AttributeError(f"module 'stream_swav' has no attribute {name!r}")
