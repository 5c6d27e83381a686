"""residual_core: the library."""
