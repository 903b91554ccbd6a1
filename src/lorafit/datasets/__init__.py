"""Synthetic datasets generated on the fly (no download): see :mod:`lorafit.datasets.shapes`."""
