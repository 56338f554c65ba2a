"""The version of rlkv, importable from anywhere in the package without loading the package root."""

__version__ = "0.1.0"
