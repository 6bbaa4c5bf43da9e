"""The version of specsight: one place, read by the package metadata, manifests and the wire
protocol."""

__version__ = "0.1.0"
