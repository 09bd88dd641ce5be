"""The IR helpers every pass shares: node.meta records, op tables, graph copies, taps, partial re-execution."""
