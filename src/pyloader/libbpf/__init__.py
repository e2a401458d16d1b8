"""A thin ctypes binding of the system libbpf: objects, maps, programs, ring
buffers. Generic: knows nothing of HTTP or of redtap's maps."""
