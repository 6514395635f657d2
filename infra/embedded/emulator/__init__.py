"""The embedded AWS: moto server on loopback, plus small documented patches for the APIs our stacks use
that moto lacks (see `patches.py`). Used by `make demo` and the test suite, never against real AWS."""
