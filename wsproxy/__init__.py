"""wsproxy: a WebSocket reverse proxy and load balancer built on trio."""

__version__ = "0.1.0"
