"""Data: public source files (mirror/cache/download), seqio tasks and mixtures."""
