"""vtx: long-video understanding with cached shot features and small transformer heads."""

__version__ = "0.1.0"
SCHEMA_VERSION = 1
