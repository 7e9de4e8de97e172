"""The package version (one place, imported by the package and by saved models)."""
__version__ = "0.1.0"
