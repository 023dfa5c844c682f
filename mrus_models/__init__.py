"""mrus_models: registration models (ACMT, INNReg, Plasticine, anatomy-aware MR→US) built on
the public API of :mod:`mrus_kernels`."""

__version__ = "0.1.0"
