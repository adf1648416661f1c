"""INT8 on the CPU: the GEMM kernel (`gemm.py`, its C++ op `gemm.cpp`) and the linear layer that runs it (`linear.py`)."""
