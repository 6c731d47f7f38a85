"""Coverage-guided fuzzers for wsproxy's sans-I/O parsers (run with ``make fuzz``; see fuzz/README.md)."""
