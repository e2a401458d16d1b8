"""Subcommands beside `redtap run`: `redtap top` (a live view of /metrics) and
`redtap replay` (captures through the same BPF object)."""
