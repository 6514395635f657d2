"""The embedded default: everything that runs without an AWS account.

`emulator` (moto server on loopback with small, documented patches for the APIs our stacks use that moto
lacks) and `demo` (`make demo`: the whole system deployed on it). Used by the demo and the test suite,
never against real AWS.
"""
