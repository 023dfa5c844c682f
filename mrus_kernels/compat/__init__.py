"""Drop-in classes for MONAI and VoxelMorph users, computed by the fused operators.

Switching is a one-line import change: ``mrus_kernels.compat.monai`` mirrors MONAI 1.6's
classes and ``mrus_kernels.compat.voxelmorph`` VoxelMorph 0.3's, with the originals'
constructor arguments, defaults and values. An argument the fused ops cannot serve raises
ValueError naming it, instead of silently giving other values. Each module's docstring lists
what it serves and what not.
"""
