"""Serving: a stage's model exported as a self-contained package, loaded without Ray or TorchRec.

``load(path).predict(rows)`` serves in-process; ``raytrain-ctr export`` writes a package
(:mod:`raytrain_ctr.serving.export`) and ``raytrain-ctr predict`` scores Parquet with it on Ray Data
(:mod:`raytrain_ctr.serving.predict`). Importing this package imports neither Ray nor TorchRec.
"""

from raytrain_ctr.serving.package import Package, PackageError, load

__all__ = ["Package", "PackageError", "load"]
