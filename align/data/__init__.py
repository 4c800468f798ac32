"""Data: webdataset pipelines and LightningDataModules, converters (``align data ...``),
synthetic sets.

Data modules are imported lazily so that light commands
(``align data --help``) do not pay for torch.
"""

_LAZY = {
    "PickAPicDataModule": "align.data.pickapic",
    "KTODataModule": "align.data.kto",
    "LongCaptionDataModule": "align.data.longcaption",
    "WinnersDataModule": "align.data.winners",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'align.data' has no attribute {name!r}")
