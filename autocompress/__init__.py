"""autocompress: hardware-aware mixed-precision compression plans for LLMs."""

__version__ = "0.1.0"
