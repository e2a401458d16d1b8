"""redtap's side of the kernel: the event ABI (a mirror of src/bpf/redtap.h),
the loaded tracer and its maps, the endpoint map, TC attachment, preflight."""
