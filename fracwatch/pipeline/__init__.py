"""Image transforms shared by inference and training (MONAI)."""
