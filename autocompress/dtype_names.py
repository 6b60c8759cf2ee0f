"""The dtypes a model is loaded and computed in, by name: torch-free, so the command line can
offer them before torch is imported (its import takes a second, and the signal handlers are put
in place first)."""

DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
