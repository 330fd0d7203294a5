"""dexserve: lossless early-exit decoding (DEX) served over gRPC."""

__version__ = "0.1.0"
