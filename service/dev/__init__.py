"""For development, demos and tests; the `run` command never calls them: `stack` (the embedded
broker and Triton from PyPI wheels), `demo` (`python -m service demo`) and `samples` (sample
events with the outcome each should have)."""
