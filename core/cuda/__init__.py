"""The PyCUDA backend: kernels as .cu files, compiled on first use; see core/cuda/NOTES.md."""
