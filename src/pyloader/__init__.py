"""redtap: HTTP/1.x access logs and R.E.D. metrics traced in the kernel with eBPF."""
__version__ = "0.1.0"
