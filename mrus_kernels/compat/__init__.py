"""Drop-in classes for MONAI and VoxelMorph users, computed by the fused operators."""
