"""caictl: Constitutional AI (Bai et al. 2022) as a command-line toolkit."""

__version__ = "0.1.0"
