"""The package version, in a module of its own so that submodules can import it without
importing the package's ``__init__`` (which imports them lazily: no import cycle)."""
__version__ = "0.1.0"
