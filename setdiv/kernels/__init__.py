"""Fused GPU kernels (Triton). Imported only where used: importing a kernel module decorates
its kernels, and on a CPU they run only under Triton's interpreter (`TRITON_INTERPRET=1`, set
before the import; the suite checks the kernels' logic that way)."""
