"""lbd: a region-aware HTTP/1.1 load balancer."""

__version__ = "0.1.0"
