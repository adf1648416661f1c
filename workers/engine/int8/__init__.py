"""INT8 on the CPU: the GEMM kernel (`gemm.py` and its C++ op, `gemm.cpp`) and the layer that runs it (`linear.py`)."""
