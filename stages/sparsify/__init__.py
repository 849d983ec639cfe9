"""The sparsify stage: N:M structured-sparse training (SR-STE, MDGF, SDGF) on the kernels of deploypipe.kernels."""
