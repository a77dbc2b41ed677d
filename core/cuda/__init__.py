"""The PyCUDA backend: kernels as .cu files, compiled on first use; CudaBackend (backend.py) is a facade over
rooms, one module each (its docstring maps them); see core/cuda/NOTES.md for the measurements."""
