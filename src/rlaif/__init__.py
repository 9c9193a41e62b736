"""rlaif: Constitutional AI and RLAIF, end to end."""

__version__ = "0.1.0"
